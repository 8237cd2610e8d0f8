"""A tiny random FLUX.2 [dev] diffusers pipeline (Flux2Pipeline), built offline and saved with `save_pretrained`.

Laid out as black-forest-labs/FLUX.2-dev is (model_index.json, transformer/, vae/, scheduler/, text_encoder/,
tokenizer/), with the release's classes: Flux2Transformer2DModel with its guidance embedding, AutoencoderKLFlux2
(tests/tiny_pipelines_flux2.py's, batch-norm statistics not the identity), Mistral3ForConditionalGeneration (a
MistralConfig text model and a tiny Pixtral vision tower, which the text path never runs) and a PixtralProcessor
around a PreTrainedTokenizerFast: a byte-level BPE trained by `tokenizers` on the system message and
:data:`WORDS`, Mistral's special tokens (``<s>`` added in front of every text by its post-processor, as the
release's tokenizer does, so a template that also writes it would give two) and a chat template that renders the
system turn and one user turn as Mistral-Small-3.1's does. The Mistral has 30 layers (the pipeline stacks hidden
states 10, 20 and 30) of width 16, so the transformer reads 48 channels.

Tests take :func:`save_flux2_dev_pipeline` through a module- or session-scoped fixture.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_pipelines_flux2 import FLUX2_SCHEDULER, TEXT_WIDTH, flux2_vae

#: Words the small vocabulary spells out whole (the rest falls back to bytes).
WORDS = ("a", "photo", "of", "cat", "red", "apple", "on", "wooden", "table", "at", "night")
#: Mistral's control tokens, in the order of their ids (0: <unk>).
SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
           "[IMG_BREAK]", "[IMG_END]")
TEXT_LAYERS = 30
#: Mistral-Small-3.1's chat template, reduced to what Flux2Pipeline renders: BOS, the system turn (its content a
#: list of one text block) and user turns of text blocks; no generation prompt.
CHAT_TEMPLATE = ("{{- bos_token }}{%- set system = messages[0]['content'][0]['text'] %}"
                 "{{- '[SYSTEM_PROMPT]' + system + '[/SYSTEM_PROMPT]' }}"
                 "{%- for message in messages[1:] %}{{- '[INST]' }}{%- for block in message['content'] %}"
                 "{{- block['text'] }}{%- endfor %}{{- '[/INST]' }}{%- endfor %}")


def mistral_tokenizer():
    """A PreTrainedTokenizerFast as Mistral-Small-3.1's: byte-level BPE, BOS added, the chat template set."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([SYSTEM_MESSAGE, " ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=400, min_frequency=1, show_progress=False, special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", SPECIAL.index("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", model_max_length=131072,
                                        extra_special_tokens=list(SPECIAL[4:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def mistral_processor(tokenizer):
    """A PixtralProcessor around `tokenizer` (the released pipeline's ``tokenizer`` component)."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    return PixtralProcessor(image_processor=PixtralImageProcessor(patch_size={"height": 4, "width": 4}),
                            tokenizer=tokenizer, patch_size=4, spatial_merge_size=2, chat_template=CHAT_TEMPLATE)


def mistral_text_encoder(tokenizer, *, seed: int):
    """A tiny random Mistral3ForConditionalGeneration: 30 text layers of width 16, a one-layer vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    ids = tokenizer.convert_tokens_to_ids
    text = MistralConfig(hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer),
                         max_position_embeddings=1024, bos_token_id=ids("<s>"), eos_token_id=ids("</s>"),
                         pad_token_id=ids("<pad>"), sliding_window=None)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, patch_size=4, image_size=32)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=ids("[IMG]"),
                            spatial_merge_size=2)
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(config).eval()


def save_flux2_dev_pipeline(path: str | Path) -> Path:
    """Save a tiny random Flux2Pipeline (guidance-embedding transformer) to `path`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    from tests.test_flux2 import flux2_model

    path = Path(path)
    tokenizer = mistral_tokenizer()
    transformer = flux2_model(6, guidance=True, joint_attention_dim=3 * TEXT_WIDTH)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=flux2_vae(7),
                         text_encoder=mistral_text_encoder(tokenizer, seed=3), tokenizer=mistral_processor(tokenizer),
                         transformer=transformer)
    pipe.save_pretrained(path)
    return path
