"""The training steps inside a whole job: teacher "original" is the uploaded folder, the artifact saves and loads."""

from core.compression.execute import execute_job
from core.compression.pipeline import StepHooks
from core.compression.spec import JobSpec
from core.compression.state import StepContext
from tests.core.training_helpers import FAST, texts
from tests.models import save_model_folder, tiny_bert, tiny_tokenizer


def test_prune_then_distill_job_uses_the_original_as_teacher(tmp_path) -> None:
    folder = save_model_folder(tiny_bert(), tmp_path / "model")
    tiny_tokenizer().save_pretrained(folder)
    rows = texts()
    spec = JobSpec.model_validate({"steps": [
        {"type": "prune", "sparsity": 0.5},
        {"type": "distill", "max_steps": 25, "lr": 3e-3, **FAST},
    ]})
    finished = []
    outcome = execute_job(folder, spec, tmp_path / "work", StepContext(texts=lambda dataset_id: rows),
                          StepHooks(finished=lambda index, report: finished.append(report)), {"job_id": "test"})
    distill = finished[1].metrics
    assert distill["heldout_loss_after"] < distill["heldout_loss_before"]
    assert distill["sparsity_after"] == 0.5
    assert finished[1].metrics["output_cosine"] >= finished[0].metrics["output_cosine"]
    assert outcome.artifact.is_file()
    assert (tmp_path / "work" / "steps" / "step-01" / "latest.json").is_file()  # checkpoints in the step's dir
