"""Train the shared byte-level BPE tokenizer once and write it to engine/tokenizer/.

This is a one-off: the output files are committed, and engine.models only copies them,
so re-running it is never part of a test run (and would change token ids if the corpus or
the tokenizers library changed). Usage: tools/train_tokenizer
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tools" / "tokenizer_corpus.txt"
OUT = ROOT / "engine" / "tokenizer"

VOCAB_SIZE = 1024  # must equal the embedded models' vocab_size
SPECIAL = "<|endoftext|>"  # bos, eos and pad alike; id 0


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    # No normalizer and no prefix space: byte-level encoding then round-trips any text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tokenizer.train([str(CORPUS)], trainer)
    size = tokenizer.get_vocab_size()
    if size != VOCAB_SIZE:
        raise SystemExit(f"trained vocab has {size} tokens, want {VOCAB_SIZE}: enlarge the corpus")

    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(OUT / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL,
        "eos_token": SPECIAL,
        "pad_token": SPECIAL,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # transformers would otherwise strip spaces before punctuation when decoding.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"bos_token": SPECIAL, "eos_token": SPECIAL, "pad_token": SPECIAL}
    (OUT / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    print(f"wrote {VOCAB_SIZE}-token tokenizer to {OUT}")


if __name__ == "__main__":
    main()
