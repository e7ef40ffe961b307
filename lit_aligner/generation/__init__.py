"""Generation on one loaded base: the decoding engine (`engine`: prefill, one decoding step, `generate`), many prompts
x many Aligners (`answers`), and corrections (`correction`)."""

from lit_aligner.generation.answers import (AlignerEntry, Answer, PromptItem, TextStreamer, answer_prompts,
                                            load_aligner_entries, read_prompts)
from lit_aligner.generation.engine import (DecodingArgs, GenerationStats, Penalties, check_sampling, cut_at_stop,
                                           generate, resolve_prefix, sample)

__all__ = ["AlignerEntry", "Answer", "DecodingArgs", "GenerationStats", "Penalties", "PromptItem", "TextStreamer",
           "answer_prompts", "check_sampling", "cut_at_stop", "generate", "load_aligner_entries", "read_prompts",
           "resolve_prefix", "sample"]
