"""DICOM networking and objects: SCP, storage layout, study assembly policy."""
