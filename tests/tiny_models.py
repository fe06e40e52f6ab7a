"""Tiny random checkpoints, built by the tests (no hub): they stand in for real model families."""
import torch

from vlminterp_utils import models


def build_tiny_llava(image_size: int = 32, patch_size: int = 8, n_layers: int = 3, hidden: int = 32,
                     attn_implementation: str = "eager", seed: int = 0, tokenizer=None):
    """A tiny randomly initialised `LlavaForConditionalGeneration` and its processor, for tests and experiments.

    Another grid (4x4 by default), another depth and width than shapes-llava: code that hard-codes any of
    shapes-llava's numbers fails on it.
    """
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tokenizer = tokenizer or models.smollm2_tokenizer()
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                              intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(
        models.IMAGE_TOKEN), vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.requires_grad_(False)
    image_processor = CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=models.CHAT_TEMPLATE,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token=models.IMAGE_TOKEN)
    return model, processor


def _text_config(kind: str, tokenizer, hidden: int, n_layers: int):
    from transformers import LlamaConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)


def build_tiny_family(family: str, tokenizer=None, hidden: int = 32, n_layers: int = 3, seed: int = 0):
    """A tiny random checkpoint shaped like a real llava-hf family, and its processor:

    - "llava-1.5": a CLIP tower at 336 px in 14 px patches (24 x 24), features from layer -2, resize + centre crop,
      a Llama LM ("default" strategy: the CLS token dropped);
    - "llava-interleave": a SigLIP tower at 384 px in 14 px patches (27 x 27 over 378 px), "full" strategy,
      a Qwen2 LM;
    - "llava-next": LLaVA-NeXT's anyres tiling (a CLIP tower at 56 px in 14 px patches, canvases of 2 to 4 tiles),
      row-end tokens, a Llama LM;
    - "qwen2-vl", "qwen2.5-vl", "qwen3-vl": see `build_tiny_qwen`; "gemma3": see `build_tiny_gemma3`;
      "idefics3", "smolvlm": see `build_tiny_idefics3`; "llava-onevision": see `build_tiny_onevision`.
    """
    if family.startswith("qwen"):
        return build_tiny_qwen(family, tokenizer, hidden, n_layers, seed)
    if family == "gemma3":
        return build_tiny_gemma3(tokenizer, hidden, n_layers, seed)
    if family == "llava-onevision":
        return build_tiny_onevision(tokenizer, hidden, n_layers, seed)
    if family in ("idefics3", "smolvlm"):
        return build_tiny_idefics3(family, tokenizer, hidden, n_layers, seed)
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor,
                              SiglipImageProcessorPil, SiglipVisionConfig)
    tokenizer = tokenizer or models.smollm2_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(models.IMAGE_TOKEN)
    small = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2)
    common = dict(tokenizer=tokenizer, chat_template=models.CHAT_TEMPLATE, image_token=models.IMAGE_TOKEN)
    torch.manual_seed(seed)
    if family == "llava-1.5":
        config = LlavaConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **small),
                             text_config=_text_config("llama", tokenizer, hidden, n_layers),
                             image_token_id=image_token_id, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_seq_length=576)
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                do_center_crop=True)
        processor = LlavaProcessor(image_processor=image_processor, patch_size=14, num_additional_image_tokens=1,
                                   vision_feature_select_strategy="default", **common)
    elif family == "llava-interleave":
        config = LlavaConfig(vision_config=SiglipVisionConfig(image_size=384, patch_size=14, **small),
                             text_config=_text_config("qwen2", tokenizer, hidden, n_layers),
                             image_token_id=image_token_id, vision_feature_layer=-1,
                             vision_feature_select_strategy="full", image_seq_length=729)
        model = LlavaForConditionalGeneration(config)
        image_processor = SiglipImageProcessorPil(size={"height": 384, "width": 384})
        processor = LlavaProcessor(image_processor=image_processor, patch_size=14, num_additional_image_tokens=0,
                                   vision_feature_select_strategy="full", **common)
    elif family == "llava-next":
        pinpoints = [[56, 112], [112, 56], [112, 112]]
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=56, patch_size=14, **small),
                                 text_config=_text_config("llama", tokenizer, hidden, n_layers),
                                 image_token_id=image_token_id, vision_feature_layer=-1,
                                 vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                     image_grid_pinpoints=pinpoints, do_center_crop=True)
        processor = LlavaNextProcessor(image_processor=image_processor, patch_size=14, num_additional_image_tokens=1,
                                       vision_feature_select_strategy="default", **common)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    model.eval().requires_grad_(False)
    return model, processor


QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL's chat format (its default system prompt, the image between vision start and end), written for
# SmolLM2's tokenizer with Qwen's special tokens added
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def build_tiny_qwen(family: str = "qwen2-vl", tokenizer=None, hidden: int = 32, n_layers: int = 3, seed: int = 0):
    """A tiny random Qwen2-VL ("qwen2-vl"), Qwen2.5-VL ("qwen2.5-vl", window attention in the tower) or Qwen3-VL
    ("qwen3-vl": 16 px patches, DeepStack) and its processor: patches merged 2 x 2, images resized into 4 x 4 to
    8 x 8 patches worth of area (so 4 to 16 visual tokens), M-RoPE. Built without torchvision: the processor is
    the image-only one."""
    import copy

    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil,
                              Qwen2VLProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor)

    from vlminterp_utils.core.processors import image_only
    tokenizer = copy.deepcopy(tokenizer or models.smollm2_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_TOKENS)})
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(list(QWEN_TOKENS))))
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                 "mrope_section": [2, 3, 3]},  # head 16: 8 pairs
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=2, hidden_size=hidden, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    torch.manual_seed(seed)
    if family == "qwen2-vl":
        config = Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=hidden, mlp_ratio=2), **ids)
        model, processor_class = Qwen2VLForConditionalGeneration(config), Qwen2VLProcessor
    elif family == "qwen2.5-vl":
        config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            vision, intermediate_size=2 * hidden, out_hidden_size=hidden, window_size=56,
            fullatt_block_indexes=[1]), **ids)
        model, processor_class = Qwen2_5_VLForConditionalGeneration(config), Qwen2_5_VLProcessor
    elif family == "qwen3-vl":  # 16 px patches; DeepStack from both tower blocks, after LLM layers 0 and 1
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        vision = dict(vision, patch_size=16, intermediate_size=2 * hidden, out_hidden_size=hidden,
                      num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        config = Qwen3VLConfig(text_config=dict(text, head_dim=hidden // 2), vision_config=vision, **ids)
        model, processor_class = Qwen3VLForConditionalGeneration(config), Qwen3VLProcessor
    else:
        raise ValueError(f"unknown tiny Qwen family {family!r}")
    patch = config.vision_config.patch_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=(4 * patch) ** 2, max_pixels=(8 * patch) ** 2,
                                               patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = image_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=QWEN_CHAT_TEMPLATE)
    model.eval().requires_grad_(False)
    return model, processor


GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == "
    "'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def build_tiny_gemma3(tokenizer=None, hidden: int = 32, n_layers: int = 3, seed: int = 0):
    """A tiny random Gemma 3 and its processor: a SigLIP tower at 64 px in 8 px patches (8 x 8), pooled 2 x 2 to
    16 tokens; sliding-window and full attention layers; the image tokens' bidirectional block from
    `token_type_ids`; Gemma's chat format with SmolLM2's tokenizer and Gemma's image tokens added."""
    import copy

    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig)
    tokenizer = copy.deepcopy(tokenizer or models.smollm2_tokenizer())
    names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer.add_special_tokens({"additional_special_tokens": list(names.values())})
    tokenizer._set_model_specific_special_tokens(names)
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=hidden // 2, query_pre_attn_scalar=hidden // 2, sliding_window=512,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"][:n_layers],
                            max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = SiglipVisionConfig(image_size=64, patch_size=8, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=2, num_attention_heads=2)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                          boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                          image_token_index=tokenizer.image_token_id)
    config.text_config._attn_implementation = config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised at zero, which would make every visual token zero
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, hidden ** -0.5)
    image_processor = Gemma3ImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA_CHAT_TEMPLATE, image_seq_length=16)
    model.eval().requires_grad_(False)
    return model, processor


SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:{% if message['content'] is "
    "string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' "
    "%}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def build_tiny_idefics3(family: str = "idefics3", tokenizer=None, hidden: int = 32, n_layers: int = 3,
                        seed: int = 0):
    """A tiny random SmolVLM ("idefics3", as SmolVLM-256M; "smolvlm", as SmolVLM2) and its processor: tiles of
    32 px in 8 px patches, pixel shuffle 2 (4 tokens a tile), images resized to 64 px on their longest side, so
    a square image is 2 x 2 tiles and the global image (20 tokens); SmolVLM's chat format."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, SmolVLMConfig, SmolVLMForConditionalGeneration,
                              SmolVLMImageProcessorPil, SmolVLMProcessor)

    import copy

    from vlminterp_utils.core.processors import image_only
    tokenizer = copy.deepcopy(tokenizer or models.smollm2_tokenizer())  # SmolVLM's image tokens added below
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>",
                                                                "<end_of_utterance>", *tiles]})
    text = _text_config("llama", tokenizer, hidden, n_layers)
    vision = dict(image_size=32, patch_size=8, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=2)
    image_token_id = tokenizer.convert_tokens_to_ids(models.IMAGE_TOKEN)
    kinds = {"idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                          Idefics3Processor),
             "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil,
                         image_only(SmolVLMProcessor))}
    config_class, model_class, image_processor_class, processor_class = kinds[family]
    config = config_class(vision_config=vision, text_config=text.to_dict(), scale_factor=2,
                          image_token_id=image_token_id)
    torch.manual_seed(seed)
    model = model_class(config)
    image_processor = image_processor_class(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                            do_image_splitting=True)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                chat_template=SMOLVLM_CHAT_TEMPLATE)
    model.eval().requires_grad_(False)
    return model, processor


def build_tiny_onevision(tokenizer=None, hidden: int = 32, n_layers: int = 3, seed: int = 0):
    """A tiny random LLaVA-OneVision and its processor: a SigLIP tower at 32 px in 8 px patches (4 x 4, no CLS),
    anyres canvases of 1 x 2 to 3 x 3 tiles, and "anyres_max_1", so any grid of more than one tile's worth of
    tokens is shrunk by the model's bilinear interpolation; a Qwen2 LM."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, SiglipVisionConfig)

    from vlminterp_utils.core.processors import image_only
    tokenizer = tokenizer or models.smollm2_tokenizer()
    pinpoints = [[32, 64], [64, 32], [64, 64], [96, 96]]
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=2, num_attention_heads=2)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=_text_config("qwen2", tokenizer, hidden,
                                                                                  n_layers).to_dict(),
                                  image_token_id=tokenizer.convert_tokens_to_ids(models.IMAGE_TOKEN),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_1")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=pinpoints)
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
        chat_template=models.CHAT_TEMPLATE, image_token=models.IMAGE_TOKEN)
    model.eval().requires_grad_(False)
    return model, processor


FAMILIES = ("llava-1.5", "llava-interleave", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl",
            "gemma3", "idefics3", "smolvlm")
