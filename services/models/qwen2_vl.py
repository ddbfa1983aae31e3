"""Family adapter for Qwen2-VL and Qwen2.5-VL.

Both run unchanged transformers modules; the adapter only knows how to split them into stages:
  - encode: the vision tower (`model.model.visual`) over a batch of images, whose `pooler_output` is one
    feature row per `<|image_pad|>` token, split back per image;
  - prefill: token embeddings with the features scattered at the placeholder positions, and the prompt's
    M-RoPE positions from transformers' own `get_rope_index` (its `rope_deltas` must travel to decode);
  - decode: position `i + rope_delta` on all three axes for a token at index `i`.

A process may hold only some of the model (services/models/stage_weights.py): an encode-only one has
no language model, embeddings or lm_head (`language_model` and `lm_head` are None), one without encode
has no vision tower (`visual` is None). M-RoPE positions need only the config, so prefill works without
the tower; calling a stage whose weights are absent raises an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.engine.attention import AttentionMetadata
from services.engine.inputs import ModelInputs


@dataclass(slots=True)
class ImageItem:
    """One preprocessed image: patches and their (t, h, w) grid."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]


class Qwen2VLFamily:
    model_types = ("qwen2_vl", "qwen2_5_vl")
    # Module paths of each part in transformers' model, for processes that build only some parts.
    part_modules = {"vision": ("model.visual",), "text": ("model.language_model", "lm_head")}
    # Stored tensor name -> module name. Qwen's releases (and transformers 5's `save_pretrained`) store
    # `visual.*` and `model.{embed_tokens,layers,norm}.*`; some newer checkpoints store `model.visual.*`
    # and `model.language_model.*`, which these rules leave as they are. The same rules as transformers'
    # conversion mapping for Qwen2VLForConditionalGeneration, which Qwen2.5-VL shares.
    checkpoint_renames = (
        (r"^visual\.", "model.visual."),
        (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    )

    def __init__(self, model: Any, image_processor: Any) -> None:
        self.model = model
        self.config = model.config
        self.image_processor = image_processor
        self.visual = model.model.visual  # None without the encode role
        self.language_model = model.model.language_model  # None in an encode-only process
        self.lm_head = model.lm_head
        self.image_token_id = int(self.config.image_token_id)
        self.merge_size = int(self.config.vision_config.spatial_merge_size)
        text = self.config.text_config
        self.num_layers = int(text.num_hidden_layers)
        self.num_kv_heads = int(text.num_key_value_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        self.hidden_size = int(text.hidden_size)
        self.max_position_embeddings = int(text.max_position_embeddings)
        self.layer_types = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]))

    @staticmethod
    def load_image_processor(path: str) -> Any:
        # The Pil processor: the default one (and AutoProcessor) pull in torchvision.
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(path)

    @property
    def device(self) -> torch.device:
        return self._weight().device

    @property
    def dtype(self) -> torch.dtype:
        """The language model's dtype (the KV cache's), or the vision tower's in an encode-only process."""
        return self._weight().dtype

    def _weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else next(self.visual.parameters())

    def _need(self, module: Any, what: str) -> Any:
        if module is None:
            raise RuntimeError(f"this process did not load the {what}: its roles do not need it")
        return module

    # ---- encode ----------------------------------------------------------------------------------

    def preprocess(self, image: Any) -> ImageItem:
        """PIL image -> patches, with the checkpoint's own image processor."""
        out = self.image_processor(images=[image], return_tensors="pt")
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        return ImageItem(out["pixel_values"], grid)  # type: ignore[arg-type]

    def num_image_tokens(self, item: ImageItem) -> int:
        t, h, w = item.grid_thw
        return t * h * w // self.merge_size**2

    @torch.inference_mode()
    def encode(self, items: list[ImageItem]) -> list[torch.Tensor]:
        """Features of several images in one vision-tower call, one tensor per image."""
        visual = self._need(self.visual, "vision tower")
        if not items:
            return []
        pixels = torch.cat([it.pixel_values for it in items]).to(self.device, visual.dtype)
        grid = torch.tensor([it.grid_thw for it in items], dtype=torch.long, device=self.device)
        features = visual(pixels, grid_thw=grid).pooler_output
        return list(features.split([self.num_image_tokens(it) for it in items]))

    # ---- prefill ---------------------------------------------------------------------------------

    def model_inputs(
        self, token_ids: list[int], grids: list[tuple[int, int, int]], features: list[torch.Tensor]
    ) -> ModelInputs:
        """Positions and features of one prompt whose placeholders are already expanded."""
        if not grids:
            return ModelInputs()
        ids = torch.tensor([token_ids], dtype=torch.long)
        is_image = ids == self.image_token_id
        indices = is_image[0].nonzero().flatten().tolist()
        embeds = torch.cat(features).to(self.device, self.dtype)
        if len(indices) != embeds.shape[0]:
            raise ValueError(
                f"the prompt has {len(indices)} image tokens but the images give {embeds.shape[0]} features"
            )
        positions, deltas = self.model.model.get_rope_index(
            ids, mm_token_type_ids=is_image.int(), image_grid_thw=torch.tensor(grids, dtype=torch.long)
        )
        return ModelInputs(
            rope_delta=int(deltas.flatten()[0]),
            positions=positions[:, 0].to(self.device),
            mm_embeds=embeds,
            mm_token_indices=indices,
        )

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._need(self.language_model, "language model").embed_tokens(token_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, paged: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a packed step: `inputs_embeds` [T, hidden], `positions` [3, T]."""
        # No cache argument: with use_cache=False the model builds none (our attention owns the KV).
        out = self._need(self.language_model, "language model")(
            inputs_embeds=inputs_embeds.unsqueeze(0),
            position_ids=positions.unsqueeze(1),
            attention_mask=dict.fromkeys(self.layer_types),
            use_cache=False,
            paged=paged,
        )
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._need(self.lm_head, "lm_head")(hidden).float()
