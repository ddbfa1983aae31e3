"""Family adapter for Qwen3-VL: Qwen2-VL's stage split plus DeepStack features.

Qwen3-VL's vision tower returns, besides the merged features (one row per placeholder token), one more
merged feature row per token for each of its `deepstack_visual_indexes` blocks; the language model adds
level `k` to the hidden states of the visual positions after its decoder layer `k`
(`Qwen3VLTextModel._deepstack_process`). The adapter keeps transformers' modules and code paths:

  - encode: one tower call per batch; each item's output is ONE tensor
    `[tokens, hidden * (1 + levels)]`, the main features then each level along the hidden axis, so an
    item crosses the data plane (and sits in the feature cache) as one transfer, not one per level;
  - prefill: `model_inputs` splits that width back into `mm_embeds` (scattered into the token
    embeddings, as for Qwen2-VL) and `ModelInputs.deepstack` `[tokens, levels, hidden]`, aligned with
    `mm_token_indices`. The model runner gathers, for one packed step, the rows of the visual tokens of
    the chunks in it and their DeepStack rows, and `forward` hands them to transformers' text model as
    `visual_pos_masks` and `deepstack_visual_embeds`: the addition happens inside transformers' own
    loop, at the layers the config names. DeepStack changes only a visual token's own hidden states, so
    a chunk that holds part of an image (chunked prefill, a prefix-cache hit) adds exactly its part;
  - positions: transformers' `get_rope_index` for Qwen3-VL (interleaved M-RoPE sections; a video is
    split into one grid per temporal patch, since the prompt puts a timestamp between its frames).
    Qwen3-VL's M-RoPE has no `second_per_grid_ts`: time enters through the prompt's timestamps;
  - decode: unchanged, no DeepStack (decode tokens are text).
"""

from __future__ import annotations

from typing import Any

import torch

from common.qwen3_vl_sampling import Qwen3VLVideoSampling
from services.engine.attention import AttentionMetadata
from services.engine.inputs import ModelInputs
from services.models.qwen2_vl import ImageItem, Qwen2VLFamily

# (visual rows of the packed step, ascending; their features [rows, levels, hidden])
DeepstackRows = tuple[torch.Tensor, torch.Tensor]


class Qwen3VLFamily(Qwen2VLFamily):
    model_types = ("qwen3_vl",)

    def __init__(self, model: Any, image_processor: Any, video_config: dict[str, Any] | None = None) -> None:
        super().__init__(model, image_processor, video_config)
        self.temporal_video = False  # no second_per_grid_ts in Qwen3-VL's get_rope_index
        # its own frame sampling and resize rule, and one placeholder run per temporal patch
        self.video_sampling = Qwen3VLVideoSampling.from_config(video_config or {})
        self.video_runs_per_patch = True
        self.deepstack_levels = len(self.config.vision_config.deepstack_visual_indexes)
        # the width of one encoder output row: what a FeatureOffer must carry
        self.feature_width = self.hidden_size * (1 + self.deepstack_levels)

    @torch.inference_mode()
    def encode(self, items: list[ImageItem]) -> list[torch.Tensor]:
        """One vision-tower call; per item, main and DeepStack features side by side in one tensor."""
        visual = self._need(self.visual, "vision tower")
        if not items:
            return []
        pixels = torch.cat([it.pixel_values for it in items]).to(self.device, visual.dtype)
        grid = torch.tensor([it.grid_thw for it in items], dtype=torch.long, device=self.device)
        out = visual(pixels, grid_thw=grid)
        features = torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)
        return list(features.split([self.num_image_tokens(it) for it in items]))

    def model_inputs(
        self,
        token_ids: list[int],
        grids: list[tuple[int, int, int]],
        features: list[torch.Tensor],
        kinds: list[str] | None = None,
        second_per_grid_ts: list[float] | None = None,
    ) -> ModelInputs:
        """As Qwen2-VL's, with each item's extra width split off into `ModelInputs.deepstack`."""
        for i, f in enumerate(features):
            if f.ndim != 2 or f.shape[1] != self.feature_width:
                raise ValueError(
                    f"item {i}: features of shape {list(f.shape)}, this model's rows have "
                    f"{self.feature_width} values (hidden {self.hidden_size} x (1 + {self.deepstack_levels}))"
                )
        h = self.hidden_size
        inputs = super().model_inputs(
            token_ids, grids, [f[:, :h] for f in features], kinds, second_per_grid_ts
        )
        if features:
            deep = torch.cat([f[:, h:] for f in features]).to(self.device, self.dtype)
            inputs.deepstack = deep.view(deep.shape[0], self.deepstack_levels, h)
        return inputs

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        paged: AttentionMetadata,
        deepstack: DeepstackRows | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a packed step; `deepstack` names its visual rows, if any."""
        extra = {}
        if deepstack is not None:
            rows, feats = deepstack
            mask = torch.zeros(1, inputs_embeds.shape[0], dtype=torch.bool, device=inputs_embeds.device)
            mask[0, rows] = True
            extra["visual_pos_masks"] = mask
            extra["deepstack_visual_embeds"] = list(feats.to(inputs_embeds.dtype).unbind(1))
        out = self._need(self.language_model, "language model")(
            inputs_embeds=inputs_embeds.unsqueeze(0),
            position_ids=positions.unsqueeze(1),
            attention_mask=dict.fromkeys(self.layer_types),
            use_cache=False,
            paged=paged,
            **extra,
        )
        return out.last_hidden_state[0]
