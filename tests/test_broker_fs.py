"""The embedded filesystem broker never shows a consumer a half-written message
(kombu writes under the final name; a 50 ms poll could read it empty)."""

from __future__ import annotations

import threading
from pathlib import Path

from kombu import Connection

from worker.scheduling.celery_app import broker_transport_options
from worker.settings import Settings


def test_messages_are_whole_when_seen(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")  # type: ignore[call-arg]
    options = broker_transport_options(settings)
    out = Path(options["data_folder_out"])
    payload = {"ids": list(range(20_000))}  # large enough to take several writes
    seen: list[dict[str, object]] = []
    errors: list[BaseException] = []
    with Connection("filesystem://", transport_options=options) as conn:
        queue = conn.SimpleQueue("q")
        stop = threading.Event()

        def consume() -> None:
            with Connection("filesystem://", transport_options=options) as c2:
                q2 = c2.SimpleQueue("q")
                while not stop.is_set() or len(seen) < 150:
                    try:
                        msg = q2.get(timeout=0.01)
                    except q2.Empty:
                        continue
                    except Exception as exc:  # a partial message: JSONDecodeError
                        errors.append(exc)
                        return
                    seen.append(msg.payload)
                    msg.ack()

        thread = threading.Thread(target=consume)
        thread.start()
        for _ in range(150):
            queue.put(payload)
        stop.set()
        thread.join(60)
    assert errors == []
    assert len(seen) == 150 and all(m == payload for m in seen)
    assert not list(out.glob("*.partial"))  # nothing left half-way
