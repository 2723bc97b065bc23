"""Inference that does not train: the teacher over label or rollout sequences into a store, and sampling
rollouts. The Hugging Face path runs on Lightning's ``Trainer.predict`` and the model's own ``generate``;
``engine: vllm`` runs on vLLM (:mod:`kdpipe.engines.vllm_engine`)."""

from kdpipe.engines.scoring import score_teacher, score_teacher_vllm, score_with, store_path

__all__ = ["score_teacher", "score_teacher_vllm", "score_with", "store_path"]
