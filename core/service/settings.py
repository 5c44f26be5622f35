"""Service settings, read from the environment with the prefix MCS_.

The defaults are the embedded stack (SQLite database, SQLite broker, artifacts on local disk under ./var), so a
fresh clone runs without any server; production points the same fields at PostgreSQL, Redis and a shared volume.
"""

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from core.compression.archive import ExtractionLimits

GiB = 1024**3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MCS_", extra="ignore")

    var_dir: Path = Path("var")
    database_url: str = ""
    broker_url: str = ""
    artifact_dir: Path | None = None
    # Where artifacts, models and datasets are stored: empty for local disk under MCS_ARTIFACT_DIR (the default), or
    # s3://bucket/prefix for an S3-compatible store (credentials: the standard AWS_* variables and ~/.aws files).
    # MCS_ARTIFACT_DIR then only holds this host's scratch (uploads in flight, jobs' inputs and outputs).
    artifact_url: str = ""
    s3_endpoint_url: str = Field("", description="MinIO, moto or another S3-compatible store; empty: AWS")
    s3_public_endpoint_url: str = Field("", description="the store's address as clients reach it, for presigned "
                                                        "URLs; empty: MCS_S3_ENDPOINT_URL")
    s3_multipart_threshold_bytes: int = Field(64 * 1024**2, ge=5 * 1024**2, description="files from this size go "
                                                                                        "up as multipart uploads")
    s3_multipart_chunk_bytes: int = Field(64 * 1024**2, ge=5 * 1024**2, description="one part of a multipart upload")
    artifact_redirect: bool = Field(False, description="GET /v1/artifacts/{id} answers 302 to a presigned URL where "
                                                       "the store has them; otherwise the API streams the file")
    artifact_redirect_ttl_s: int = Field(300, gt=0, le=7 * 24 * 3600, description="how long a presigned URL works")

    max_upload_bytes: int = Field(2 * GiB, gt=0)
    max_dataset_bytes: int = Field(256 * 1024**2, gt=0)
    max_extracted_bytes: int = Field(4 * GiB, gt=0)
    max_archive_members: int = Field(1000, gt=0)
    max_compression_ratio: float = Field(200.0, gt=1)
    max_model_parameters: int = Field(80_000_000_000, gt=0, description="70B-class models fit")
    # 160 GiB fits a 70B model in bf16 (140 GB of weights), uploaded file by file (POST /v1/uploads)
    max_model_upload_bytes: int = Field(160 * GiB, gt=0, description="all files of one chunked upload together")
    max_upload_file_bytes: int = Field(160 * GiB, gt=0, description="one file of a chunked upload")
    max_upload_files: int = Field(1000, gt=0, description="files in the manifest of one chunked upload")
    upload_ttl_s: int = Field(24 * 3600, gt=0, description="a chunked upload expires this long after it was created")

    job_soft_time_limit_s: int = Field(3240, gt=0)
    job_hard_time_limit_s: int = Field(3600, gt=0)
    job_max_attempts: int = Field(2, ge=1)
    job_lease_s: int = Field(60, gt=0, description="a running job's worker renews its lease every third of this")
    sweep_interval_s: float = Field(30.0, gt=0, description="how often each worker sweeps expired leases")
    scratch_max_age_s: int = Field(6 * 3600, gt=0, description="untouched upload/job scratch older than this is swept")
    reconcile_after_s: int = Field(30, ge=0, description="queued jobs older than this are re-sent at worker start")
    rate_limit_per_minute: int = Field(600, ge=0, description="requests per API key (or client address); 0: off")
    rate_limit_burst: int = Field(60, gt=0)
    max_form_files: int = Field(4, gt=0, description="files in one multipart request")
    max_form_fields: int = Field(16, gt=0, description="text fields in one multipart request")
    max_form_field_bytes: int = Field(64 * 1024, gt=0, description="bytes of one multipart text field")
    max_json_bytes: int = Field(1024**2, gt=0, description="bytes of a request body that is not a multipart upload")
    body_timeout_s: float = Field(30.0, gt=0, description="longest wait for the next piece of a request body")
    db_pool_size: int = Field(10, gt=0, description="database connections each process keeps open")
    db_max_overflow: int = Field(10, ge=0, description="connections opened beyond the pool at busy times")
    default_queue: str = "cpu"
    # TinyLlama-1.1B shape (2.2 GB of bf16): 7.0 GB peak compressed in memory, 1.4 GB for a whole layer-by-layer job
    stream_above_bytes: int = Field(2 * GiB, ge=0, description="jobs on weight files over this run layer by layer "
                                                               "when every step can; 0: whenever they can")
    # A job whose estimate reaches the soft limit gets twice its estimate as hard limit, up to this cap: 48 h holds
    # twice the estimate of a 70B gptq even on a CPU worker (19.4 h; a 7B one: 1.9 h). 0, or any value up to
    # MCS_JOB_HARD_TIME_LIMIT_S: every job keeps the fixed limits. Redis' visibility_timeout is sized from this.
    job_max_hard_time_limit_s: int = Field(48 * 3600, ge=0, description="the longest hard time limit a job's "
                                                                         "estimate can raise it to; 0: off")
    # Observability (core/service/metrics.py, core/service/logs.py)
    metrics_token: str = Field("", description="GET /metrics requires `Authorization: Bearer <this>`; empty: open")
    worker_metrics_port: int = Field(0, ge=0, lt=65536, description="a worker serves its host's metrics on this "
                                                                    "port; 0: off")
    # Tenant quotas (core/service/quotas.py): the defaults; `mcs quotas set` overrides them per tenant. 0: no limit
    quota_stored_bytes: int = Field(0, ge=0, description="models, datasets and artifacts a tenant may store")
    quota_running_jobs: int = Field(8, ge=0, description="a tenant's jobs running at once; more wait in the queue")
    quota_queued_jobs: int = Field(100, ge=0, description="a tenant's jobs waiting; a submission beyond is a 429")
    quota_recheck_s: float = Field(5.0, gt=0, description="a job held back by the running-jobs quota is offered "
                                                          "to the workers again after this long")
    # Live events (core/service/events.py, core/service/webhooks.py)
    events_redis_url: str = Field("", description="Redis for waking SSE streams (pub/sub); empty: MCS_BROKER_URL "
                                                  "when it is Redis, else the streams poll the database")
    sse_keepalive_s: float = Field(15.0, gt=0, description="an SSE stream sends a comment after this much silence")
    sse_poll_s: float = Field(1.0, gt=0, description="an SSE stream reads the events table at least this often")
    # Imports (POST /v1/models/import, core/service/imports.py): models already in a bucket or a local HF cache
    import_s3_buckets: str = Field("", description="comma-separated buckets that s3:// imports may read (never the "
                                                   "artifact bucket); empty: no s3:// imports")
    import_s3_profile: str = Field("", description="the AWS profile s3:// imports use when a request brings no "
                                                   "credentials; empty: such a request is refused")
    import_allow_private: bool = Field(False, description="allow an import's S3 endpoint on loopback, private or "
                                                          "link-local addresses (tests, private deployments)")
    hf_mirror_dir: str = Field("", description="a Hugging Face hub cache that hf:// imports read offline; empty: "
                                               "HF_HUB_CACHE (the service never downloads from the Hub)")
    webhook_allow_private: bool = Field(False, description="allow webhook URLs that resolve to loopback, private or "
                                                           "link-local addresses (tests, private deployments)")
    webhook_max_attempts: int = Field(8, ge=1, description="tries of one delivery before it is `failed`")
    webhook_retry_base_s: float = Field(5.0, gt=0, description="first retry delay; doubles with every retry (1 h cap)")
    webhook_timeout_s: float = Field(10.0, gt=0, description="one delivery's HTTP request")

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> "Settings":
        var = self.var_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{var / 'mcs.sqlite'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{var / 'broker.sqlite'}"
        if self.artifact_dir is None:
            self.artifact_dir = var / "artifacts"
        if self.artifact_url:
            from core.service.storage.s3 import parse_s3_url

            parse_s3_url(self.artifact_url)  # a malformed URL stops the process at start, naming the variable
        if self.job_soft_time_limit_s >= self.job_hard_time_limit_s:
            raise ValueError("MCS_JOB_SOFT_TIME_LIMIT_S must be below MCS_JOB_HARD_TIME_LIMIT_S")
        return self

    @property
    def extraction_limits(self) -> "ExtractionLimits":
        from core.compression.archive import ExtractionLimits

        return ExtractionLimits(self.max_archive_members, self.max_extracted_bytes, self.max_compression_ratio)

    @property
    def work_dir(self) -> Path:
        """Scratch space for uploads in flight and jobs in progress (same filesystem as artifacts: atomic renames)."""
        assert self.artifact_dir is not None
        return self.artifact_dir / "tmp"


@lru_cache
def get_settings() -> Settings:
    return Settings()
