"""Train the small bundled sentencepiece tokenizer on the bundled data (deterministic).

    python scripts/train_tokenizer.py [--data-dir hp_deepspeed/bundled/data]
                                      [--out hp_deepspeed/bundled/tokenizer] [--vocab-size 1000]

A unigram sentencepiece model with T5's conventions (pad=0, eos=1, unk=2, no bos, ``▁``
word boundaries), trained single-threaded on the preprocessed inputs and targets of every
registry task's bundled files, then wrapped as a ``transformers`` ``T5Tokenizer`` with 100
``<extra_id_N>`` sentinels (as T5 has) and saved as a folder ``AutoTokenizer`` loads offline.
It only exists so the demo and the tests run without the hub; real runs use T5's tokenizer.
Training twice on the same data gives the same ``spiece.model``.
"""

from __future__ import annotations

import argparse
import io
import shutil
import string
import tempfile
from pathlib import Path

import sentencepiece

from hp_deepspeed.data.config import BUNDLED_DATA_DIR, BUNDLED_TOKENIZER_DIR, DataConfig
from hp_deepspeed.data.sources import locate, read_split
from hp_deepspeed.data.tasks import REGISTRY, build_tasks

EXTRA_IDS = 100


# The fidelity suite is tokenised by this tokenizer but not part of its corpus: the study's
# numbers were measured with the tokenizer trained on the demo and format-check tasks, and
# adding a suite must not change how every other bundled text tokenises.
NOT_IN_CORPUS = ("fidelity/",)


def corpus(data_dir: Path) -> list[str]:
    """Every input and target text of the splits of the registry tasks found in ``data_dir``
    (except the fidelity suite's)."""
    names = [n for n in REGISTRY if (data_dir / n).is_dir() and not n.startswith(NOT_IN_CORPUS)]
    cfg = DataConfig(tasks=names, data_dir=str(data_dir))
    lines = []
    with tempfile.TemporaryDirectory() as cache:
        for task in build_tasks(cfg):
            for split in [s for s in (task.train_split, *task.eval_splits) if s is not None]:
                path, content = locate(task, split)
                raw = read_split(task, split, path, content, "error", Path(cache))
                for row in raw.rows:
                    for example in task.preprocess(row, training=split == task.train_split):
                        lines += [example.inputs, example.targets]
    # Every printable ASCII character once, so any ASCII text tokenises without <unk>.
    return lines + [" ".join(string.printable.strip())]


def train(data_dir: Path, out: Path, vocab_size: int) -> None:
    from transformers import T5Tokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(data_dir)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        # The corpus is small: allow fewer pieces than asked rather than failing.
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "spiece.model").write_bytes(model.getvalue())
    # Loading the folder converts spiece.model into a fast tokenizer (tokenizer.json).
    tokenizer = T5Tokenizer.from_pretrained(str(out), extra_ids=EXTRA_IDS)
    tokenizer.save_pretrained(str(out))
    print(f"saved a {len(tokenizer)}-token tokenizer to {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=BUNDLED_DATA_DIR)
    parser.add_argument("--out", type=Path, default=BUNDLED_TOKENIZER_DIR)
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args(argv)
    train(args.data_dir, args.out, args.vocab_size)


if __name__ == "__main__":
    main()
