"""Prefix-repetition prompts as text that a server's tokenizer reads back as the intended ids.

A server that takes text only (``mlx_lm.server``) tokenizes the prompt itself, so the bench
sends text whose tokenization is known: every token of every prompt is a *whole word* of the
model's tokenizer, a token whose text is a space and ASCII letters and which encodes back to
itself alone. A byte-level BPE pre-tokenizer splits text before each space, so a run of such
words encodes word by word, back to the same ids and the same lengths (checked, prompt by
prompt, in ``prompt_texts``). The prompts keep the workload's structure: the seeded draws of
``prefix_repetition_prompts`` pick among the whole words instead of the whole vocabulary.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tools.bench_workload import Workload, prefix_repetition_prompts


def load_tokenizer(model_folder: str | Path):
    """The folder's tokenizer through mlx-lm's loader, the one ``mlx_lm.server`` encodes with."""
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    return mlx_lm_load_tokenizer(Path(model_folder))


def whole_word_ids(tokenizer) -> list[int]:
    """Ids whose text is " " + ASCII letters and whose text encodes back to that id alone."""
    words = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        word = text[1:]
        if (
            text.startswith(" ")
            and word.isascii()
            and word.isalpha()
            and tokenizer.encode(text, add_special_tokens=False) == [token_id]
        ):
            words.append(token_id)
    if not words:
        raise ValueError("the tokenizer has no whole-word tokens (' ' + letters that encode back alone)")
    return words


def word_prompts(workload: Workload, words: Sequence[int]) -> list[list[int]]:
    """The workload's prompts (same seed, same structure) drawn among ``words`` only."""
    return [[words[index] for index in prompt] for prompt in prefix_repetition_prompts(workload, len(words))]


def prompt_texts(tokenizer, prompts: Sequence[Sequence[int]]) -> list[str]:
    """Each prompt's text; raises unless it encodes back to the same ids (no special tokens added)."""
    texts = []
    for number, prompt in enumerate(prompts):
        text = tokenizer.decode(list(prompt))
        back = tokenizer.encode(text, add_special_tokens=False)
        if back != list(prompt):
            first = next((i for i, (a, b) in enumerate(zip(prompt, back)) if a != b), min(len(prompt), len(back)))
            raise ValueError(
                f"prompt {number} ({len(prompt)} ids) does not survive decode and encode: it parts at "
                f"position {first} ({list(prompt[first:first + 3])} became {back[first:first + 3]})"
            )
        texts.append(text)
    return texts


def server_token_ids(tokenizer, text: str) -> list[int]:
    """The ids a server that encodes ``text`` as ``mlx_lm.server`` does sees (special tokens included)."""
    return tokenizer.encode(text)


def http_plan(workload: Workload, tokenizer, num_warmup: int = 2):
    """Everything tools/bench_http sends: the workload as whole-word prompts (ids and text), and
    warm-up and probe prompts that start with a word no workload prompt starts with."""
    from tools.bench_http import HttpPlan

    words = whole_word_ids(tokenizer)
    prompts = word_prompts(workload, words)
    firsts = {prompt[0] for prompt in prompts}
    outsider = next(word for word in words if word not in firsts)
    rng = np.random.default_rng(workload.seed + 1)
    warmup = [
        [outsider, *(words[i] for i in rng.integers(0, len(words), size=workload.prompt_len - 1))]
        for _ in range(num_warmup)
    ]
    probe = [outsider, *(words[i] for i in rng.integers(0, len(words), size=7))]
    texts = prompt_texts(tokenizer, prompts)
    (probe_text,) = prompt_texts(tokenizer, [probe])
    return HttpPlan(
        prompts=prompts,
        texts=texts,
        text_lengths=[len(server_token_ids(tokenizer, text)) for text in texts],
        output_len=workload.output_len,
        warmup=warmup,
        warmup_texts=prompt_texts(tokenizer, warmup),
        probe=probe,
        probe_text=probe_text,
        probe_text_ids=server_token_ids(tokenizer, probe_text),
        eos_ids=sorted(tokenizer.eos_token_ids or ()),
    )
