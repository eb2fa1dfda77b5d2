"""The training tokenizer (a sentencepiece model, no BOS, `</s>` as end of document) behind
transformers' `AutoTokenizer`: text maps to exactly the ids megatron-stag trained on, because encoding
and decoding are sentencepiece's own, with no prefix or normalisation added. Written beside an
exported Hugging Face folder and loaded there through `auto_map` (`trust_remote_code=True`)."""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class StagTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, eos_token: str = "</s>", unk_token: str = "<unk>", **kwargs):
        kwargs.setdefault("padding_side", "left")  # decoder-only batches: pad before the prompt
        super().__init__(vocab_file=vocab_file, eos_token=eos_token, unk_token=unk_token, legacy=True, **kwargs)
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
