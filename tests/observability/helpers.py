"""Reading Prometheus' text format in the observability tests."""

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    return sum(v for n, sample_labels, v in samples(text) if n == name and labels.items() <= sample_labels.items())


def label_values(text: str) -> set[str]:
    return {v for _, labels, _ in samples(text) for v in labels.values()}
