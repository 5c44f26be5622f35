"""The Alembic migrations and the SQLAlchemy models describe the same schema, in both directions."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.service.db.migrate import downgrade, upgrade
from core.service.db.models import Base
from core.service.db.session import make_engine


def schema_diff(url: str) -> list:
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    return diff


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    return names


def test_upgrade_downgrade_upgrade_matches_models(database_url):
    assert schema_diff(database_url) == []
    downgrade(database_url, "base")
    assert table_names(database_url) == {"alembic_version"}
    upgrade(database_url)
    assert schema_diff(database_url) == []
    assert {t.name for t in Base.metadata.sorted_tables} <= table_names(database_url)
