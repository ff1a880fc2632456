"""The golden catalogue for real, trained checkpoints: chat-templated text prompts.

Where the tiny models' catalogue (``suites/golden_cases.py``) draws token ids from a seed,
a real model gets what its users send: conversations rendered by the model's own chat
template. Two system prompts are shared by several questions, as the seed benchmark shared
one long prefix; a question is asked twice in one batch; a two-turn conversation starts
with another case's whole prompt (a prompt that is a prefix of another, with the templates
that render history verbatim, as SmolLM2's does); and a continuation reuses blocks that a
decode wrote. Batches run in catalogue order, so the suites predict every hit exactly.

The cases are built from the model's tokenizer, so the same catalogue serves SmolLM2 and a
user's own checkpoint; the golden file records the resulting token ids, and a tokenizer
that drifts is caught when they differ. Outputs are short (12 to 16 tokens): the engine
runs a 135M model on the CPU's reference BLAS at about 60 ms a prompt token.
"""

from dataclasses import dataclass

from suites.golden_cases import Case

SYSTEM_PROMPTS = {
    "shop": (
        "You are a concise assistant for a bicycle repair shop. Answer in one or two sentences, "
        "and suggest a visit to the shop when a repair needs special tools."
    ),
    "library": (
        "You are a friendly librarian at a small public library. Give short, practical answers "
        "about borrowing books, opening hours and what to read next."
    ),
}
BLOCK_SIZE = 16  # recorded in the golden; the suites replay the cases at several block sizes
MAX_TOKENS = 12


@dataclass(frozen=True, slots=True)
class ChatCatalogue:
    cases: list[Case]
    texts: dict[str, str]  # case name -> the chat-templated text (continuations have none)


def _conversation(system: str, *turns: str) -> list[dict[str, str]]:
    """A system prompt, then alternating user and assistant turns (a user turn last)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[system]}]
    roles = ("user", "assistant")
    messages += [{"role": roles[index % 2], "content": turn} for index, turn in enumerate(turns)]
    return messages


# (batch, label, conversation, max_tokens), in generation order.
CONVERSATIONS = [
    ("shop", "oil_chain", _conversation("shop", "How often should I oil my chain?"), 16),
    ("shop", "squeaky_brakes", _conversation("shop", "Why do my brakes squeak when it rains?"), MAX_TOKENS),
    ("shop", "tire_pressure", _conversation("shop", "What tire pressure should I use on a city bike?"), MAX_TOKENS),
    ("library", "renew_copy0", _conversation("library", "Can I renew a book online?"), MAX_TOKENS),
    ("library", "renew_copy1", _conversation("library", "Can I renew a book online?"), MAX_TOKENS),
    ("library", "after_hobbit", _conversation("library", "What should I read after The Hobbit?"), MAX_TOKENS),
    (
        "follow_up",
        "oil_chain_second_turn",
        _conversation(
            "shop",
            "How often should I oil my chain?",
            "Every few weeks, and after every ride in the rain.",
            "Which oil should I use?",
        ),
        MAX_TOKENS,
    ),
    ("follow_up", "audiobooks", _conversation("library", "Do you lend audiobooks?"), MAX_TOKENS),
]


def chat_catalogue(tokenizer) -> ChatCatalogue:
    """The cases for the model whose (Hugging Face or mlx-lm) tokenizer is given."""
    cases, texts = [], {}
    for batch, label, messages, max_tokens in CONVERSATIONS:
        name = f"chat/{batch}/{label}"
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already holds the special tokens: add none of the tokenizer's own.
        ids = tokenizer.encode(text, add_special_tokens=False)
        cases.append(Case(name, BLOCK_SIZE, f"chat/{batch}", tuple(int(t) for t in ids), max_tokens=max_tokens))
        texts[name] = text
    # The engine's own answer fed back: its prompt ends in blocks that a decode wrote.
    cases.append(Case("chat/continuation/oil_chain_answer", BLOCK_SIZE, "chat/continuation", (),
                      max_tokens=MAX_TOKENS, continues="chat/shop/oil_chain"))
    return ChatCatalogue(cases, texts)
