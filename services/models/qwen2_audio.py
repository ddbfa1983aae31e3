"""Family adapter for Qwen2-Audio: a Whisper-style audio encoder in front of a Qwen2 language model.

Same interface as Qwen2VLFamily (the engine and the workers call both the same way), split into stages:
  - encode: log-mel features from the checkpoint's own `WhisperFeatureExtractor`, called exactly as
    `Qwen2AudioProcessor` calls it (padded to the 30 s window, truncated past it, with the frame mask),
    then transformers' `audio_tower` and `multi_modal_projector` over a batch of clips, with the
    padding masked out of the encoder's attention as `Qwen2AudioModel.forward` masks it. A clip of L
    unpadded frames gives `_get_feat_extract_output_lengths(L)` rows (common/audio_features.py counts
    the same without torch); the rows past them are padding and are dropped, as transformers drops them;
  - prefill: token embeddings with the features scattered at the `<|AUDIO|>` placeholders, in prompt
    order. Positions are plain 0..n-1 (`ModelInputs.positions` None): Qwen2-Audio has no M-RoPE;
  - decode: position i for the token at index i (rope_delta 0).

The wire and the prefill checks describe every item by a (t, h, w) grid; an audio clip is (1, 1, n),
n its token count, and this family's `merge_size` is 1, so the grid arithmetic gives n tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.placeholder_runs import item_positions
from services.engine.attention import AttentionMetadata
from services.engine.inputs import ModelInputs


@dataclass(slots=True)
class AudioItem:
    """One preprocessed clip: its padded log-mel features and how many of their frames are audio."""

    input_features: torch.Tensor  # [num_mel_bins, n_samples // hop_length]
    num_frames: int  # the feature_attention_mask's sum
    num_tokens: int  # encoder rows it gives

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        return (1, 1, self.num_tokens)


class Qwen2AudioFamily:
    model_types = ("qwen2_audio",)
    modalities = ("audio",)
    auto_class = "AutoModelForMultimodalLM"  # AutoModelForImageTextToText does not map qwen2_audio
    encoder_config = "audio_config"  # the sub-config whose attention is transformers' sdpa
    # "vision" names the encoder part for services/models/stage_weights.py (the E role's weights)
    part_modules = {
        "vision": ("model.audio_tower", "model.multi_modal_projector"),
        "text": ("model.language_model", "lm_head"),
    }
    # Qwen's release (and transformers 5's `save_pretrained`) store `audio_tower.*`,
    # `multi_modal_projector.*` and `language_model.{model,lm_head}.*`; names already in the module
    # layout are left alone. transformers' own conversion mapping for qwen2_audio does the same.
    checkpoint_renames = (
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^audio_tower\.", "model.audio_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    )
    image_token_id = None  # takes no images or videos
    video_token_id = None
    merge_size = 1

    def __init__(self, model: Any, feature_extractor: Any, video_config: Any = None) -> None:
        self.model = model
        self.config = model.config
        self.feature_extractor = feature_extractor
        self.audio_tower = model.model.audio_tower  # None without the encode role
        self.projector = model.model.multi_modal_projector
        self.language_model = model.model.language_model  # None in an encode-only process
        self.lm_head = model.lm_head
        self.audio_token_id = int(self.config.audio_token_index)
        self.sampling_rate = int(feature_extractor.sampling_rate)
        text = self.config.text_config
        self.num_layers = int(text.num_hidden_layers)
        self.num_kv_heads = int(text.num_key_value_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        self.hidden_size = int(text.hidden_size)
        self.max_position_embeddings = int(text.max_position_embeddings)
        self.layer_types = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]))

    @staticmethod
    def load_image_processor(path: str) -> Any:
        """The checkpoint's feature extractor (the loader's name for a family's preprocessor)."""
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor.from_pretrained(path)

    @property
    def device(self) -> torch.device:
        return self._weight().device

    @property
    def dtype(self) -> torch.dtype:
        """The language model's dtype (the KV cache's), or the encoder's in an encode-only process."""
        return self._weight().dtype

    def _weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.projector.linear.weight

    def _need(self, module: Any, what: str) -> Any:
        if module is None:
            raise RuntimeError(f"this process did not load the {what}: its roles do not need it")
        return module

    # ---- encode ----------------------------------------------------------------------------------

    def preprocess_audio(self, samples: np.ndarray) -> AudioItem:
        """Mono float32 samples at the extractor's rate -> features, as `Qwen2AudioProcessor` makes them."""
        out = self.feature_extractor(
            samples, sampling_rate=self.sampling_rate, return_attention_mask=True, padding="max_length",
            return_tensors="pt",
        )  # fmt: skip
        frames = int(out["attention_mask"][0].sum())
        tokens = int(self._output_lengths(torch.tensor([frames]))[0])
        if tokens < 1:
            raise ValueError(f"the audio gives {frames} feature frames, too short for one audio token")
        return AudioItem(out["input_features"][0], frames, tokens)

    @staticmethod
    def _output_lengths(frames: torch.Tensor) -> torch.Tensor:
        after_conv = (frames - 1) // 2 + 1  # the model's _get_feat_extract_output_lengths
        return (after_conv - 2) // 2 + 1

    def num_image_tokens(self, item: AudioItem) -> int:
        return item.num_tokens

    @torch.inference_mode()
    def encode(self, items: list[AudioItem]) -> list[torch.Tensor]:
        """Features of several clips in one encoder call, one [tokens, hidden] tensor per clip."""
        from transformers.masking_utils import create_bidirectional_mask

        tower = self._need(self.audio_tower, "audio tower")
        if not items:
            return []
        features = torch.stack([it.input_features for it in items]).to(self.device, tower.conv1.weight.dtype)
        frames = torch.tensor([it.num_frames for it in items], dtype=torch.long, device=self.device)
        after_conv = (frames - 1) // 2 + 1
        # the encoder's attention sees only each clip's own frames, as in Qwen2AudioModel.forward
        max_len = (features.shape[-1] - 2) // 2 + 1
        mask_2d = (torch.arange(max_len, device=self.device)[None, :] < after_conv[:, None]).long()
        dummy = torch.zeros((len(items), max_len, 1), dtype=features.dtype, device=self.device)
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=mask_2d)
        hidden = tower(features, attention_mask=mask).last_hidden_state
        out = self.projector(hidden)
        return [out[i, : it.num_tokens] for i, it in enumerate(items)]

    # ---- prefill ---------------------------------------------------------------------------------

    def model_inputs(
        self,
        token_ids: list[int],
        grids: list[tuple[int, int, int]],
        features: list[torch.Tensor],
        kinds: list[str] | None = None,
        second_per_grid_ts: list[float] | None = None,
    ) -> ModelInputs:
        """Features of one prompt whose `<|AUDIO|>` placeholders are already expanded, in prompt order.

        `grids`, `kinds` and `second_per_grid_ts` are the vision families' (read only for their count
        and kind here): positions stay plain, so nothing but the features' order matters.
        """
        if not grids:
            return ModelInputs()
        if any(k != "audio" for k in kinds or ["audio"] * len(grids)):
            raise ValueError("this model takes audio only")
        # the clips' runs; an `<|AUDIO|>` typed past them is text (common/placeholder_runs.py)
        indices = item_positions(token_ids, self.audio_token_id, [g[2] for g in grids])
        embeds = torch.cat(features).to(self.device, self.dtype)
        if len(indices) != embeds.shape[0]:
            raise ValueError(
                f"the prompt has {len(indices)} audio tokens but the items give {embeds.shape[0]} features"
            )
        return ModelInputs(mm_embeds=embeds, mm_token_indices=indices)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._need(self.language_model, "language model").embed_tokens(token_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, paged: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a packed step; `positions` [3, T] (the engine's M-RoPE layout)
        holds the same plain positions on every row, so the first is the 1-D RoPE position."""
        out = self._need(self.language_model, "language model")(
            inputs_embeds=inputs_embeds.unsqueeze(0),
            position_ids=positions[0].unsqueeze(0),
            attention_mask=dict.fromkeys(self.layer_types),
            use_cache=False,
            paged=paged,
        )
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._need(self.lm_head, "lm_head")(hidden).float()
