"""Alembic environment: targets core.service.db metadata, database URL from the service settings (MCS_DATABASE_URL)."""

from alembic import context

from core.service.db.models import Base
from core.service.db.session import make_engine
from core.service.settings import get_settings

target_metadata = Base.metadata


def run_migrations() -> None:
    url = context.config.attributes.get("database_url") or get_settings().database_url
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
