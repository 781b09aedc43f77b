"""The data stage: landing zone, batches, importers, per-image metadata, GX validation,
curation (curated store + quarantine), the steward report and the versioned dataset manifest."""
