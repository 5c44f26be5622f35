"""Calibration tokens for a data-driven quantize step, from the step's `calibration` block."""

from core.compression.configs.quantize import CalibrationData
from core.compression.corpus import CalibrationBatch, calibration_batch
from core.compression.state import ModelState, StepContext, model_device


def calibration_for(state: ModelState, calibration: CalibrationData, ctx: StepContext) -> CalibrationBatch:
    """`num_samples` x `seq_len` token ids from the step's dataset (or the default corpus), tokenized with the
    model's tokenizer; seeded random ids when the model came without one. seq_len is cut to the model's positions.
    """
    config = state.model.config
    seq_len = min(calibration.seq_len, getattr(config, "max_position_embeddings", calibration.seq_len))
    texts = [] if state.tokenizer is None else ctx.texts(calibration.dataset_id)
    batch = calibration_batch(texts, state.tokenizer, calibration.num_samples, seq_len, config.vocab_size)
    if seq_len < calibration.seq_len:
        batch.notes.append(f"seq_len {calibration.seq_len} cut to the model's {seq_len} positions")
    device = model_device(state.model)
    batch.input_ids = batch.input_ids.to(device)
    return batch
