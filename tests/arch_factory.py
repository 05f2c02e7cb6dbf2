"""Tiny random-weight encoders of each supported architecture, with a tokenizer of the kind their
released checkpoints use, built locally (no hub): WordPiece for BERT/DistilBERT, byte-level BPE for
RoBERTa/ModernBERT, Unigram (SentencePiece style, ``▁``) for XLM-R. Saved with ``save_pretrained``
into one directory (model + tokenizer), as a downloaded checkpoint would be.
"""

from __future__ import annotations

from pathlib import Path

from tests.text_factory import documents

# architecture (model_type) → the tokenizer kind its released checkpoints use
TOKENIZER_OF = {"bert": "wordpiece", "distilbert": "wordpiece", "roberta": "bpe", "xlm-roberta": "unigram",
                "modernbert": "bpe"}
BERT_SPECIALS = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
ROBERTA_SPECIALS = dict(bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                        pad_token="<pad>", mask_token="<mask>")


def texts(n_docs: int = 200, seed: int = 0) -> list[str]:
    return [" ".join(d.split()) for d in documents(n_docs, seed=seed)]


def build_tokenizer(kind: str, vocab_size: int = 600, corpus: list[str] | None = None):
    """(``tokenizers.Tokenizer``, special-token kwargs for ``PreTrainedTokenizerFast``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    corpus = corpus or texts()
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            continuing_subword_prefix="##", show_progress=False))
        c, s = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", c), ("[SEP]", s)])
        return tok, BERT_SPECIALS
    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids 0..3; <mask> last
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True)])
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                          add_prefix_space=False)
        return tok, ROBERTA_SPECIALS
    assert kind == "unigram", kind
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                                            special_tokens=specials, show_progress=False))
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok, ROBERTA_SPECIALS


def save_tokenizer(tok, specials: dict, out: Path) -> Path:
    """As ``PreTrainedTokenizerFast`` (class ``TokenizersBackend``): a model-specific class would
    rebuild the normaliser / pre-tokenizer on load (research note 14, §3)."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **specials).save_pretrained(str(out))
    return out


def tiny_config(model_type: str, tok, specials: dict, max_len: int = 64):
    """A 2-layer, hidden-32 config of ``model_type`` whose special ids are the tokenizer's."""
    from transformers import BertConfig, DistilBertConfig, ModernBertConfig, RobertaConfig, XLMRobertaConfig

    ids = {k: tok.token_to_id(v) for k, v in specials.items()}
    vocab = tok.get_vocab_size(with_added_tokens=True)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    pad = ids["pad_token"]
    if model_type == "bert":
        return BertConfig(vocab_size=vocab, pad_token_id=pad, max_position_embeddings=max_len, **shape)
    if model_type in ("roberta", "xlm-roberta"):
        cls = RobertaConfig if model_type == "roberta" else XLMRobertaConfig
        return cls(vocab_size=vocab, pad_token_id=pad, bos_token_id=ids["cls_token"], eos_token_id=ids["sep_token"],
                   max_position_embeddings=max_len + pad + 1, type_vocab_size=1, **shape)
    if model_type == "distilbert":
        return DistilBertConfig(vocab_size=vocab, pad_token_id=pad, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                max_position_embeddings=max_len)
    assert model_type == "modernbert", model_type
    return ModernBertConfig(vocab_size=vocab, pad_token_id=pad, bos_token_id=ids["cls_token"],
                            eos_token_id=ids["sep_token"], cls_token_id=ids["cls_token"],
                            sep_token_id=ids["sep_token"], max_position_embeddings=max_len,
                            global_attn_every_n_layers=2, local_attention=16, **shape)


def tiny_model_dir(model_type: str, out: Path, seed: int = 0, max_len: int = 64, nsp_head: bool = False) -> Path:
    """``out`` holding a random-weight ``*ForMaskedLM`` (BERT: ``BertForPreTraining`` with
    ``nsp_head``) of ``model_type`` and its tokenizer, both ``save_pretrained``."""
    import torch
    from transformers import AutoModelForMaskedLM, BertForPreTraining

    tok, specials = build_tokenizer(TOKENIZER_OF[model_type])
    config = tiny_config(model_type, tok, specials, max_len)
    torch.manual_seed(seed)
    model = BertForPreTraining(config) if nsp_head else AutoModelForMaskedLM.from_config(config)
    model.save_pretrained(str(out))
    save_tokenizer(tok, specials, out)
    return out
