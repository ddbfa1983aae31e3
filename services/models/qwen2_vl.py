"""Family adapter for Qwen2-VL and Qwen2.5-VL.

Both run unchanged transformers modules; the adapter only knows how to split them into stages:
  - encode: the vision tower (`model.model.visual`) over a batch of images and videos, whose
    `pooler_output` is one feature row per `<|image_pad|>` or `<|video_pad|>` token, split back per
    item. transformers' `get_video_features` calls the same tower with the video's grid, so a video is
    one more item: its patches (services/models/video_patches.py) with a grid whose t may exceed 1;
  - prefill: token embeddings with the features scattered at the placeholder positions (images and
    videos in prompt order), and the prompt's M-RoPE positions from transformers' own `get_rope_index`
    with both grids and, for Qwen2.5-VL, the videos' `second_per_grid_ts` (its `rope_deltas` must
    travel to decode);
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

from common.placeholder_runs import item_positions, run_lengths
from common.video import PreparedVideo
from common.video_sampling import VideoSampling
from services.engine.attention import AttentionMetadata
from services.engine.inputs import ModelInputs
from services.models.video_patches import VideoNormalization, video_pixel_values

MM_TOKEN_TYPES = {"image": 1, "video": 2}  # get_rope_index's mm_token_type_ids: text 0, image 1, video 2


@dataclass(slots=True)
class ImageItem:
    """One preprocessed image or video: patches and their (t, h, w) grid."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]


class Qwen2VLFamily:
    model_types = ("qwen2_vl", "qwen2_5_vl")
    modalities = ("image", "video")
    auto_class = "AutoModelForImageTextToText"  # the transformers class that builds the model
    encoder_config = "vision_config"  # the sub-config whose attention is transformers' sdpa
    video_runs_per_patch = False  # Qwen3-VL's videos: one placeholder run per temporal patch
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

    def __init__(self, model: Any, image_processor: Any, video_config: dict[str, Any] | None = None) -> None:
        self.model = model
        self.config = model.config
        self.image_processor = image_processor
        video_config = video_config or {}
        self.video_sampling = VideoSampling.from_config(video_config)  # the patch geometry for videos
        self.video_norm = VideoNormalization.of(video_config, image_processor)
        self.visual = model.model.visual  # None without the encode role
        self.language_model = model.model.language_model  # None in an encode-only process
        self.lm_head = model.lm_head
        self.image_token_id = int(self.config.image_token_id)
        self.video_token_id = int(self.config.video_token_id)
        self.temporal_video = self.config.model_type == "qwen2_5_vl"  # M-RoPE time in seconds
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

    def preprocess_video(self, video: PreparedVideo) -> ImageItem:
        """Resized, padded frames -> patches, as `Qwen2VLVideoProcessor` makes `pixel_values_videos`."""
        s = self.video_sampling
        pixels, grid = video_pixel_values(
            video.frames, self.video_norm, patch_size=s.patch_size, merge_size=s.merge_size,
            temporal_patch_size=s.temporal_patch_size,
        )  # fmt: skip
        if grid != tuple(video.grid_thw):
            raise ValueError(f"the frames make grid {list(grid)}, the plan says {list(video.grid_thw)}")
        return ImageItem(pixels, grid)

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
        self,
        token_ids: list[int],
        grids: list[tuple[int, int, int]],
        features: list[torch.Tensor],
        kinds: list[str] | None = None,
        second_per_grid_ts: list[float] | None = None,
    ) -> ModelInputs:
        """Positions and features of one prompt whose placeholders are already expanded.

        `grids`, `features` and `kinds` ("image" or "video", all images when None) list the items in
        prompt order; `second_per_grid_ts` gives each item's seconds per temporal patch (read for
        videos only, and only by Qwen2.5-VL's M-RoPE).
        """
        if not grids:
            return ModelInputs()
        kinds = kinds or ["image"] * len(grids)
        ids = torch.tensor([token_ids], dtype=torch.long)
        # text, but for the items' placeholder runs: a placeholder past them, or of a kind with no
        # items, is an ordinary token (common/placeholder_runs.py)
        types = torch.zeros_like(ids, dtype=torch.int)
        for kind, pad in (("image", self.image_token_id), ("video", self.video_token_id)):
            lengths = [
                n
                for g, k in zip(grids, kinds, strict=True)
                if k == kind
                for n in run_lengths(k, g, self.merge_size, self.video_runs_per_patch)
            ]
            if lengths:
                types[0, item_positions(token_ids, pad, lengths)] = MM_TOKEN_TYPES[kind]
        indices = types[0].nonzero().flatten().tolist()
        embeds = torch.cat(features).to(self.device, self.dtype)
        if len(indices) != embeds.shape[0]:
            raise ValueError(
                f"the prompt has {len(indices)} image and video tokens but the items give "
                f"{embeds.shape[0]} features"
            )

        def grid_of(kind: str) -> torch.Tensor | None:
            chosen = [g for g, k in zip(grids, kinds, strict=True) if k == kind]
            return torch.tensor(chosen, dtype=torch.long) if chosen else None

        extra = {}
        if self.temporal_video and "video" in kinds:
            seconds = second_per_grid_ts or [1.0] * len(grids)
            extra["second_per_grid_ts"] = torch.tensor(
                [s for s, k in zip(seconds, kinds, strict=True) if k == "video"]
            )
        positions, deltas = self.model.model.get_rope_index(
            ids,
            mm_token_type_ids=types,
            image_grid_thw=grid_of("image"),
            video_grid_thw=grid_of("video"),
            **extra,
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
