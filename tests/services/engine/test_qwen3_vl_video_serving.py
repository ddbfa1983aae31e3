"""A Qwen3-VL video request as served: the gateway's prompt (timestamped runs per temporal patch), the
encoder's frames (decoded with the settings the gateway planned with), the prefill's placeholder check
(one run per temporal patch), then our engine, against transformers' greedy generate on the same ids
and pixels (the fidelity test's reference path; transformers' video processor needs torchvision, so the
reference gets the encoder's pixels, whose frames and grid the gateway test checks against it)."""

from __future__ import annotations

import base64
import io
import json

import pytest

from common.protocol import MMRef, Prefill
from common.sampling_params import SamplingParams
from common.tokenizer import TextTokenizer
from common.video_plan import sampling_of
from gateway.config import GatewayConfig
from gateway.openai_api import ChatCompletionRequest, decode_body
from gateway.preprocess import Preprocessor
from services.models.loader import load_model
from services.prefill.validation import KvGeometry, PrefillLimits, mm_problem
from tests.reference import hf_greedy, make_image
from tests.services.engine.test_qwen3_vl_fidelity import MAX_TOKENS, ours
from tests.video_helpers import make_video, video_item


@pytest.fixture(scope="module")
def q3(tiny_qwen3_vl):
    return load_model(tiny_qwen3_vl)


def served(checkpoint, video: bytes, image=None):
    content = [
        {
            "type": "video_url",
            "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video).decode()},
        }
    ]
    if image is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content.append({"type": "image_url", "image_url": {"url": uri}})
    content.append({"type": "text", "text": "What happens in the video?"})
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS}
    request = decode_body(json.dumps(body).encode(), ChatCompletionRequest)
    pre = Preprocessor(GatewayConfig(model_dir=checkpoint), TextTokenizer.from_dir(checkpoint))
    return pre.chat(request, "chatcmpl-1", 8192)


def limits(fam, runs_per_patch: bool) -> PrefillLimits:
    return PrefillLimits(
        vocab_size=fam.config.text_config.vocab_size, max_model_len=8192, image_token_id=fam.image_token_id,
        merge_size=fam.merge_size, hidden_size=fam.feature_width, kv=KvGeometry(16, 1, "shm"),
        max_feature_bytes=1 << 30, video_token_id=fam.video_token_id,
        video_runs_per_patch=runs_per_patch,
    )  # fmt: skip


@pytest.mark.parametrize("with_image", [False, True])
def test_a_served_video_request_gets_transformers_tokens(q3, tiny_qwen3_vl, with_image):
    fam = q3.family
    video, image = make_video(10, 64, 48, 5, seed=3), make_image(84, 56, seed=5)
    request = served(tiny_qwen3_vl, video, image if with_image else None)
    # the encoder samples with the settings the gateway sent, on its own copy of the rule
    assert sampling_of(request.images[0].video, fam.video_sampling) == fam.video_sampling
    v_item, plan = video_item(fam, video)
    assert v_item.grid_thw == request.images[0].grid_thw and v_item.grid_thw[0] > 1
    items = [v_item] + ([fam.preprocess(image)] if with_image else [])
    kinds = [x.kind for x in request.images]
    refs = [MMRef(hash=x.hash, grid_thw=x.grid_thw, num_tokens=x.num_tokens, kind=x.kind,
                  second_per_grid_t=x.second_per_grid_t) for x in request.images]  # fmt: skip
    msg = Prefill(request_id="r", token_ids=request.token_ids, params=SamplingParams(), mm=refs)
    assert mm_problem(msg, PrefillLimits.of(fam, _Engine(), _Plane(), 1 << 30)) is None
    assert "placeholder runs" in (mm_problem(msg, limits(fam, False)) or "")  # one run per item: refused
    ids = request.token_ids
    ref_tokens, _ = hf_greedy(tiny_qwen3_vl, fam, ids, items, MAX_TOKENS, kinds=kinds)
    tokens, _ = ours(q3, ids, items, kinds)
    assert tokens == ref_tokens and tokens


class _Kv:
    block_size, block_bytes = 16, 1


class _Engine:
    max_model_len, kv = 8192, _Kv()


class _Plane:
    def descriptor(self):
        return {"backend": "shm"}
