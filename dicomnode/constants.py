"""Identity of the objects pacs-ai produces (used for loop protection too)."""

OWN_MANUFACTURER = "pacs-ai"
SOFTWARE_VERSION = "0.1.0"
