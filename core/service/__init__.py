"""The service: settings (MCS_*), database, artifact storage, uploads, datasets and job submission. It builds on
the compression library (core.compression) and is used by the API and the worker; the library never imports it."""
