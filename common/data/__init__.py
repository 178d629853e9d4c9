"""A site's data: manifests, images (PNG/JPEG/DICOM), the torch Dataset, and the data check."""
