"""Shared fixtures: a tiny random BERT with a tiny SentencePiece-style tokenizer, and tiny data files."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "is", "der", "die", "und", "le", "chat", "el", "gato"]
TINY_CJK = ["猫", "犬", "が", "は", "座", "っ", "た", "。"]


@pytest.fixture(autouse=True, scope="session")
def _isolated_feature_cache(tmp_path_factory):
    """Tests never read or fill the user's feature cache."""
    os.environ["DLFA_FEATURE_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield


def shared_data(task: str) -> Path:
    """The real data folder for a task, or skip the test when ../shared/data is absent."""
    folder = SHARED_DATA / task
    if not folder.is_dir():
        pytest.skip(f"real data not available at {folder}")
    return folder


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = [(tok, 0.0) for tok in specials]
    vocab += [("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in TINY_WORDS]
    vocab += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [(c, -3.0) for c in TINY_CJK]
    vocab += [(f"▁{c}", -4.0) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        pad_token="<pad>", unk_token="<unk>",
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local model folder (random 4-layer BERT, H=32) usable wherever a model name is accepted."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, type_vocab_size=2, pad_token_id=1,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


CONLLU_SENTENCES = {
    "en": [
        [("the", "DET"), ("cat", "NOUN"), ("sat", "VERB"), ("on", "ADP"), ("the", "DET"), ("mat", "NOUN"), (".", "PUNCT")],
        [("a", "DET"), ("dog", "NOUN"), ("is", "AUX"), ("on", "ADP"), ("a", "DET"), ("mat", "NOUN")],
        [("the", "DET"), ("dog", "NOUN"), ("sat", "VERB"), (".", "PUNCT")],
    ],
    "de": [[("der", "DET"), ("Hund", "NOUN"), ("und", "CCONJ"), ("die", "DET"), ("Katze", "NOUN"), (".", "PUNCT")]],
    "ja": [[("猫", "NOUN"), ("が", "ADP"), ("座っ", "VERB"), ("た", "AUX"), ("。", "PUNCT")]],
}


def write_conllu(path: Path, sentences) -> Path:
    lines = []
    for n, sentence in enumerate(sentences, start=1):
        lines.append(f"# sent_id = {n}")
        for i, (form, tag) in enumerate(sentence, start=1):
            lines.append("\t".join([str(i), form, "_", tag, "_", "_", "_", "_", "_", "_"]))
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_udpos_dir(tmp_path) -> Path:
    """en train/dev and de/ja test files in the plain `<lang>-<split>.conllu` naming."""
    folder = tmp_path / "udpos"
    folder.mkdir()
    write_conllu(folder / "en-train.conllu", CONLLU_SENTENCES["en"] * 4)
    write_conllu(folder / "en-dev.conllu", CONLLU_SENTENCES["en"])
    write_conllu(folder / "en-test.conllu", CONLLU_SENTENCES["en"][:2])
    write_conllu(folder / "de-test.conllu", CONLLU_SENTENCES["de"])
    write_conllu(folder / "ja-test.conllu", CONLLU_SENTENCES["ja"])
    return folder
