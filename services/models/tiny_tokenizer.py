"""A small byte-level BPE tokenizer with Qwen2-VL's special tokens, built offline.

Tiny test checkpoints need a real tokenizer (chat template, special tokens, byte fallback for any
input) but there is no model hub to download one from. Training a byte-level BPE on a corpus generated
here takes well under a second, and because the corpus and the trainer are both deterministic, the
same `tokenizer.json` comes out of every build: checkpoints built on two machines agree.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO = "<|AUDIO|>"
AUDIO_EOS = "<|audio_eos|>"
# Added after training, so the audio tokenizer's vocabulary is the vision one's plus these three
# (appended after the trained ids): the vision checkpoints keep exactly the tokenizer they had.
AUDIO_TOKENS = (AUDIO_BOS, AUDIO, AUDIO_EOS)

# Order fixes the ids: the trainer gives special tokens ids 0..6 in this order.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

VOCAB_SIZE = 1536
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL's template: an image part becomes one <|image_pad|> between vision markers; the caller
# expands it to the image's real token count once the image size is known.
CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part.get('type') in ('image', 'image_url') or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.get('type') in ('video', 'video_url') or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ render(message['content']) }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-Audio's template (transformers' Qwen2AudioProcessor default): each audio part becomes
# "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\n", numbered across the whole conversation; the caller
# expands the one <|AUDIO|> to the clip's token count. `input_audio` and `audio_url` parts count too,
# so the raw OpenAI message renders as the gateway's reduced one does.
AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content.get('type') in ('audio', 'input_audio', 'audio_url') or 'audio' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COLOURS = (
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey",
    "cyan", "magenta", "gold", "silver", "teal", "navy", "maroon", "olive", "violet",
)  # fmt: skip
_SHAPES = (
    "circle", "square", "triangle", "rectangle", "star", "hexagon", "oval", "diamond", "pentagon",
    "cross", "arrow", "heart", "line", "dot", "cube", "sphere", "cone", "cylinder",
)  # fmt: skip
_OBJECTS = (
    "cat", "dog", "car", "house", "tree", "flower", "bird", "boat", "chair", "table", "cup", "book",
    "lamp", "window", "door", "mountain", "river", "cloud", "apple", "banana", "bicycle", "clock",
    "phone", "computer", "person", "child", "horse", "bridge", "road", "sign", "train", "plane",
)  # fmt: skip
_PLACES = (
    "on the left", "on the right", "at the top", "at the bottom", "in the centre", "in the corner",
    "near the edge", "behind the tree", "next to the house", "under the table", "above the door",
)  # fmt: skip
_ADJECTIVES = (
    "small", "large", "bright", "dark", "shiny", "old", "new", "round", "tall", "short", "soft",
    "heavy", "light", "striped", "spotted", "blurry", "sharp", "wooden", "metal", "plastic",
)  # fmt: skip
_VERBS = (
    "sits", "stands", "runs", "flies", "floats", "shines", "waits", "moves", "rests", "turns",
    "looks", "jumps", "grows", "falls", "opens", "closes", "points", "leans", "glows", "hides",
)  # fmt: skip
_QUESTIONS = (
    "What is in this image?",
    "Describe the picture in detail.",
    "How many objects can you see?",
    "What colour is the {obj}?",
    "Where is the {shape} in the image?",
    "Is there a {obj} in the photo?",
    "Which shape is {colour}?",
    "Can you count the {shape}s?",
    "What is the {adj} thing {place}?",
    "Please summarise what you see.",
    "Why does the {obj} look {adj}?",
    "Does the {colour} {shape} touch the {obj}?",
)
_ANSWERS = (
    "The image shows a {adj} {colour} {shape} {place}.",
    "I can see {n} {colour} {shape}s and a {adj} {obj}.",
    "There is a {obj} {place}, and it is {colour}.",
    "Yes, there is a {adj} {obj} {place}.",
    "No, I do not see a {obj} in this picture.",
    "The {shape} is {colour} and it is {adj}.",
    "In total there are {n} objects: {n2} {shape}s and {n3} {obj}s.",
    "The picture is {adj}; the main colour is {colour}.",
    "A {colour} {obj} stands {place}, next to a {shape}.",
    "Sure! The {obj} looks {adj}, with a {colour} {shape} on it.",
    "The {adj} {obj} {verb} {place} while a {colour} {shape} {verb2} nearby.",
    "Because the light is {adj}, the {obj} {verb} and looks {colour}.",
)
_FACTS = (
    "The sum of {n} and {n2} is {s}.",
    "There are {n} days left, then {n2} more weeks.",
    "Version {n}.{n2}.{n3} was released in {y}.",
    "The width is {w} pixels and the height is {h} pixels.",
    "Step {n}: open the file, read line {n2}, and write the result.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Please answer in one short sentence, using plain English.",
    "def area(w, h):\n    return w * h  # {n} x {n2} = {p}",
    '{{"width": {w}, "height": {h}, "colour": "{colour}"}}',
    "The quick brown fox jumps over the lazy dog {n} times.",
)


def _corpus(lines: int = 900) -> list[str]:
    """Varied English lines built from templates with a fixed seed, so every build sees the same text."""
    rng = random.Random(1234)
    out: list[str] = []
    for i in range(lines):
        n, n2, n3 = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 9)
        fields = {
            "colour": rng.choice(_COLOURS),
            "shape": rng.choice(_SHAPES),
            "obj": rng.choice(_OBJECTS),
            "place": rng.choice(_PLACES),
            "adj": rng.choice(_ADJECTIVES),
            "verb": rng.choice(_VERBS),
            "verb2": rng.choice(_VERBS),
            "n": n,
            "n2": n2,
            "n3": n3,
            "s": n + n2,
            "p": n * n2,
            "y": rng.randint(1990, 2030),
            "w": rng.choice((28, 56, 224, 448, 640, 1024, 1280)),
            "h": rng.choice((28, 56, 224, 448, 480, 720, 1080)),
        }
        template = (_QUESTIONS, _ANSWERS, _FACTS)[i % 3]
        line = rng.choice(template).format(**fields)
        out.append(line.capitalize() if rng.random() < 0.1 else line)
    # every word on its own as well, so common words become single tokens
    for group in (_COLOURS, _SHAPES, _OBJECTS, _ADJECTIVES, _VERBS):
        out.extend(" ".join(group) for _ in range(3))
    out.extend(str(k) for k in range(1000))
    return out


def _train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def build_tokenizer(audio: bool = False) -> PreTrainedTokenizerFast:
    """Train the tokenizer and wrap it with the special tokens and chat template transformers expects.

    No BOS is added to prompts (as in Qwen2-VL); `<|im_end|>` ends a turn and is the EOS. `audio`
    adds Qwen2-Audio's three audio tokens and its chat template instead of the vision one.
    """
    audio_tokens = list(AUDIO_TOKENS) if audio else []
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train(),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, *audio_tokens],
        model_max_length=32768,
        padding_side="left",
    )
    tokenizer.chat_template = AUDIO_CHAT_TEMPLATE if audio else CHAT_TEMPLATE
    return tokenizer
