"""The training tokenizer (a sentencepiece model, no BOS, `</s>` as end of document) behind
transformers' `AutoTokenizer`, giving exactly the ids megatron-stag trained on.

`hf_tokenizer` returns a tokenizers-backed (fast) tokenizer wherever the `tokenizers` library can
reproduce sentencepiece exactly: BPE over unnormalised text, the settings `prepare-data` trains with
(and Llama's). Written as `tokenizer.json`, it loads with no code of ours and no `trust_remote_code`.
For other sentencepiece settings (NFKC normalisation, collapsed whitespace, unigram models) no
tokenizers pipeline gives the same ids, so `StagTokenizer` wraps sentencepiece itself; an exported
folder then ships this file and loads it through `auto_map` (`trust_remote_code=True`).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class StagTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, eos_token: str = "</s>", unk_token: str = "<unk>", **kwargs):
        kwargs.setdefault("padding_side", "left")  # decoder-only batches: pad before the prompt
        kwargs["legacy"] = True  # also in a saved tokenizer_config.json
        super().__init__(vocab_file=vocab_file, eos_token=eos_token, unk_token=unk_token, **kwargs)
        if self.pad_token is None:
            self.pad_token = self.eos_token

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 + (token_ids_1 or [])


def _fast_pipeline(vocab_file: str):
    """A `tokenizers.Tokenizer` computing sentencepiece's ids and text for this model, or None where
    its settings have no exact equivalent. BPE merges in piece-score order are sentencepiece's own
    merge order; the dummy prefix is a normaliser (sentencepiece adds it before any leading space);
    `<0xNN>` pieces are the byte fallback; control pieces (`</s>`) are special tokens."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    with open(vocab_file, "rb") as f:
        proto.ParseFromString(f.read())
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if (trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE or spec.precompiled_charsmap
            or spec.remove_extra_whitespaces or not trainer.byte_fallback):
        return None
    scores = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(scores)}
    tok = Tokenizer(models.BPE(vocab, generate_merges(vocab, scores), unk_token=trainer.unk_piece,
                               fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else [])])
    control = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type == control])
    return tok


def hf_tokenizer(vocab_file: str, **kwargs):
    """The transformers tokenizer for a sentencepiece `.model`: fast where exact, else StagTokenizer.
    Its end-of-document piece pads, on the left (decoder-only batches)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
    eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
    kwargs.update(eos_token=eos, unk_token=sp.id_to_piece(sp.unk_id()), pad_token=eos, padding_side="left")
    pipeline = _fast_pipeline(str(vocab_file))
    if pipeline is None:
        return StagTokenizer(vocab_file=str(vocab_file), **kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=pipeline, **kwargs)
