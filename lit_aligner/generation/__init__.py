"""Generation on one loaded base: the decoding engine (`engine`: prefill, one decoding step, `generate`), many prompts
x many Aligners (`answers`), corrections (`correction`) and structured outputs (`structured`)."""

from lit_aligner.generation.answers import (AlignerEntry, Answer, PromptItem, TextStreamer, answer_prompts,
                                            load_aligner_entries, read_prompts)
from lit_aligner.generation.engine import (DecodingArgs, GenerationStats, Penalties, check_sampling, cut_at_stop,
                                           generate, resolve_prefix, sample)
from lit_aligner.generation.structured import OutputFormat, compile_grammar

__all__ = ["AlignerEntry", "Answer", "DecodingArgs", "GenerationStats", "OutputFormat", "Penalties", "PromptItem",
           "TextStreamer", "answer_prompts", "check_sampling", "compile_grammar", "cut_at_stop", "generate",
           "load_aligner_entries", "read_prompts", "resolve_prefix", "sample"]
