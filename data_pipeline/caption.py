"""Captions for a MultiCamVideo root, written by a local vision-language model (the dataset ships none).

    python -m data_pipeline.caption --input_root=/data/MultiCamVideo-Dataset \
        --model_dir=/models/llava-1.5-7b-hf [--output=ROOT/captions.csv --batch_size=8]

One caption per scene: the 10 cameras film the same animated content and a shard keeps one text per
scene, so one camera's video (`--camera`) describes it, at a tenth of the cost of every video.
`--frames` frames spread over the clip are tiled into one image, so any transformers
image-text-to-text model whose processor has a chat template can be used (tested: a tiny random LLaVA).

Rows `file_name,text` (scene id, one-line caption: `prepare --captions` reads them) are appended
after every batch. A rerun skips the scenes already in the file and drops a row cut short by a kill,
so a killed run resumes where it stopped. A scene whose video cannot be read, or whose caption comes
out empty, is reported and left for the next run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import io
import math

import numpy as np
import tqdm

from data_pipeline import multicam, video
from recam_jax import storage

DEFAULT_PROMPT = "Describe the content of this video in detail: the scene, the subjects and their motion."


def sample_frames(path: str, clip_frames: int, frames: int, height: int, width: int) -> np.ndarray:
    """`frames` frames (frames, height, width, 3) uint8 evenly spread over the first `clip_frames`."""
    clip = video.read_video(path, clip_frames, height, width)
    picked = clip[np.linspace(0, clip_frames - 1, frames).round().astype(int)]
    return ((picked + 1.0) * 127.5).round().astype(np.uint8)


def tile(frames: np.ndarray) -> np.ndarray:
    """Frames (n, h, w, 3) laid out row by row on a near-square grid, one image; blank cells are black."""
    n, h, w, _ = frames.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, frame in enumerate(frames):
        grid[(i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w] = frame
    return grid


class Captioner:
    """A local image-text-to-text model and its processor: images -> one-line captions."""

    def __init__(self, model_dir: str, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 120,
                 device: str | None = None, dtype: str = "float32"):  # fmt: skip
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row at the same place
        model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        self.max_new_tokens = max_new_tokens

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        inputs = self.processor(images=images, text=[self.prompt] * len(images), padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.model.dtype)  # only the floating tensors (pixels) are cast
        with self.torch.inference_mode():
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = tokens[:, inputs["input_ids"].shape[1] :]
        return [" ".join(text.split()) for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def captioned_scenes(output: str) -> set[str]:
    """Scene ids already in `output` after dropping a row cut short by a kill; writes the header if none."""
    data = storage.read_bytes(output) if storage.exists(output) else b""
    complete = data[: data.rfind(b"\n") + 1] or csv_lines([("file_name", "text")])  # a complete row ends a line
    if complete != data:
        with storage.atomic_open(output, "wb") as f:
            f.write(complete)
    return set(multicam.load_captions(output))


def csv_lines(rows) -> bytes:
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    return text.getvalue().encode("utf-8")


def caption_scenes(input_root: str, output: str, captioner, camera: int = 1, frames: int = 4, clip_frames: int = 81,
                   height: int = 240, width: int = 416, batch_size: int = 8) -> dict[str, str]:  # fmt: skip
    """Appends a caption row for every scene not yet in `output`; returns the scenes left out, with why."""
    scenes = multicam.find_scenes(storage.join(input_root, "train"))
    done = captioned_scenes(output)
    todo = [scene for scene in scenes if scene.scene_id not in done]
    failed = {}

    def scene_image(scene):
        try:
            return tile(sample_frames(scene.video_path(camera), clip_frames, frames, height, width))
        except video.VideoError as e:
            return e

    progress = tqdm.tqdm(total=len(scenes), initial=len(scenes) - len(todo), unit="scene", desc="caption")
    with contextlib.closing(storage.AppendLog(output)) as log, concurrent.futures.ThreadPoolExecutor(batch_size) as decoders, \
            progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = {}
            for scene, image in zip(batch, decoders.map(scene_image, batch)):  # ffmpeg decodes in parallel
                if isinstance(image, video.VideoError):
                    failed[scene.scene_id] = str(image)
                else:
                    images[scene.scene_id] = image
            texts = dict(zip(images, captioner(list(images.values())))) if images else {}
            failed.update({scene_id: "empty caption" for scene_id, text in texts.items() if not text})
            log.write(csv_lines([(scene_id, text) for scene_id, text in texts.items() if text]))
            log.flush()
            progress.update(len(batch))
    return failed


def write_tiny_vlm(model_dir: str, words: list[str], seed: int = 0) -> None:
    """A random 1-layer LLaVA (CLIP vision, Llama text) with a word-level tokenizer over `words`, saved
    with its processor and chat template: what `Captioner` loads, built offline in a second."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)  # fmt: skip

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:"]
    vocab = {token: i for i, token in enumerate([*specials, *sorted(set(words) - set(specials))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")  # fmt: skip
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
                   chat_template=template, num_additional_image_tokens=1).save_pretrained(model_dir)  # fmt: skip
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=16),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    LlavaForConditionalGeneration(config).save_pretrained(model_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_root", required=True, help="MultiCamVideo root (holds train/)")
    parser.add_argument("--model_dir", required=True, help="local transformers image-text-to-text model + processor")
    parser.add_argument("--output", help="CSV to append to (default INPUT_ROOT/captions.csv)")
    parser.add_argument("--camera", type=int, default=1, choices=multicam.CAMERAS, help="the camera whose video is described")
    parser.add_argument("--frames", type=int, default=4, help="frames tiled into the image the model sees")
    parser.add_argument("--clip_frames", type=int, default=81, help="frames of a clip (the frames are spread over them)")
    parser.add_argument("--height", type=int, default=240, help="height of one tiled frame")
    parser.add_argument("--width", type=int, default=416, help="width of one tiled frame")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max_new_tokens", type=int, default=120)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    output = args.output or storage.join(args.input_root, "captions.csv")
    captioner = Captioner(args.model_dir, args.prompt, args.max_new_tokens, args.device, args.dtype)
    failed = caption_scenes(args.input_root, output, captioner, args.camera, args.frames, args.clip_frames,
                            args.height, args.width, args.batch_size)  # fmt: skip
    for scene_id, reason in failed.items():
        print(f"not captioned (a rerun retries it): {scene_id}: {reason}")
    print(f"{output}: {len(multicam.load_captions(output))} scenes captioned, {len(failed)} left for a rerun")


if __name__ == "__main__":
    main()
