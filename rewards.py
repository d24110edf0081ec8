"""Image rewards behind one contract.

    fn = load_reward(spec, device="cpu", threads=0)
    fn(images, prompts) -> (B,) float32 tensor on the images' device

A reward function may be called from several threads at once (vgpo scores each sampling step's
instant rewards in a thread pool while the sampler runs on): every reward here is thread-safe.
`threads` is how many CPU threads a CPU reward uses (0: one per core): OCR reads the images of
every call in one pool of that many threads, shared by calls that run at once.

`images` is a float tensor (B, 3, H, W) in [0, 1]; `prompts` a list of B strings. `spec` is a
name from REWARDS or a weighted mix "ocr:1.0,pickscore:0.5" (the weighted SUM of the parts).
Every reward says its range; SPEC section 3 wants rewards in roughly [0, 1], because the
timestep weights of Eq. 11 divide by a trajectory's mean value. Heavy imports and downloads
happen inside each factory (rapidocr, transformers, the hub), so listing or mixing rewards costs
nothing until one is loaded.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2  # OpenCV, installed with rapidocr-onnxruntime
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import shapes

OFFLINE_REWARDS = ("ocr", "jpeg_compressibility", "jpeg_incompressibility", "geneval_shapes", "geneval_shapes_score")


def check_inputs(images, prompts) -> None:
    """Raise a ValueError naming the problem unless images/prompts follow the contract."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    lo, hi = images.min().item(), images.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")


def to_uint8(images) -> list:
    """(B, 3, H, W) in [0, 1] -> list of B (H, W, 3) uint8 numpy arrays."""
    arr = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
    return list(arr.permute(0, 2, 3, 1).cpu().numpy())


# ------------------------------------------------------------------------------------------------
# JPEG (DDPO): pure, offline
# ------------------------------------------------------------------------------------------------


def jpeg_bits_per_pixel(images, quality: int = 95) -> torch.Tensor:
    """JPEG size (quality 95, as DDPO) in bits per pixel. (B, 3, H, W) -> (B,)."""
    sizes = []
    for arr in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, format="JPEG", quality=quality)
        sizes.append(8 * buffer.tell() / (arr.shape[0] * arr.shape[1]))
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_incompressibility(device="cpu", threads=0):
    """Range [0, ~1]: JPEG size over raw 24-bit RGB size. DDPO uses kB; this is the same order."""
    return lambda images, prompts: jpeg_bits_per_pixel(images) / 24


def jpeg_compressibility(device="cpu", threads=0):
    """Range [~0, 1]: 1 - JPEG size over raw 24-bit RGB size (DDPO's -kB, shifted and scaled)."""
    return lambda images, prompts: 1 - jpeg_bits_per_pixel(images) / 24


# ------------------------------------------------------------------------------------------------
# OCR (Flow-GRPO's definition) with rapidocr-onnxruntime, whose models ship in the package
# ------------------------------------------------------------------------------------------------


def target_text(prompt: str) -> str:
    """The quoted part of an OCR prompt: the first "double-quoted", else 'single-quoted' text.

    A single quote counts only as a quotation mark (not after a letter when it opens, not before one
    when it closes), so apostrophes are not read as quotes: it's a sign that says 'OK' -> OK.
    """
    match = re.search(r'"([^"]+)"', prompt) or re.search(r"(?<!\w)'(.+?)'(?!\w)", prompt)
    if match is None:
        raise ValueError(f"OCR reward: prompt {prompt!r} has no quoted target text, e.g. 'a sign that says \"WORD\"'")
    return match.group(1)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR score, case- and space-insensitive: 1 when the target occurs anywhere in the
    recognised text, else 1 - min(edit_distance, len(target)) / len(target)."""
    norm = lambda s: s.lower().replace(" ", "")
    recognised, target = norm(recognised), norm(target)
    distance = 0 if target in recognised else min(edit_distance(recognised, target), len(target))
    return 1 - distance / max(len(target), 1)


def ocr(device="cpu", threads=0):
    """Range [0, 1]. Deterministic. rapidocr has no batch entry point: the images of one call are
    read in parallel by a pool of `threads` threads (0: one per CPU core) owned by this reward,
    each with its own engine (onnxruntime releases the GIL). Calls that run at once share the
    pool, so the cores are never oversubscribed; its threads live as long as the reward, so
    engines are made once, whichever thread calls the reward."""
    from rapidocr_onnxruntime import RapidOCR

    threads = threads or os.cpu_count() or 1
    local = threading.local()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="ocr")

    def read(arr, target):
        if not hasattr(local, "engine"):  # one engine per thread: an engine is not safe to share
            # Detector input as PaddleOCR's default (used by Flow-GRPO): longest side capped at 960,
            # never upscaled (rapidocr's own default upscales the shorter side to 736: 1.7x slower).
            # One onnxruntime thread per engine: the parallelism is across images. (On 2 cores an
            # engine with its own thread pool read 5.9 images/s, one single-threaded engine 25.)
            local.engine = RapidOCR(det_limit_type="max", det_limit_side_len=960, intra_op_num_threads=1)
        result, _ = local.engine(arr[:, :, ::-1].copy(), use_cls=False)  # rapidocr reads BGR
        return ocr_score("".join(line[1] for line in result or []), target)

    def reward_fn(images, prompts):
        targets = [target_text(p) for p in prompts]  # validate every prompt before any OCR
        arrays = to_uint8(images)
        scores = list(pool.map(read, arrays, targets))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    return reward_fn


# ------------------------------------------------------------------------------------------------
# CLIP-type rewards (PickScore, CLIP score, LAION aesthetic): batched, preprocessing in torch
# ------------------------------------------------------------------------------------------------


def clip_preprocess(images, size: int, mean, std) -> torch.Tensor:
    """CLIP's preprocessing in torch: shortest side to `size` (bicubic), centre crop, normalise."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(
        images.float(),
        size=(max(size, round(h * scale)), max(size, round(w * scale))),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )  # (B, 3, h', w')
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size].clamp(0, 1)  # (B, 3, size, size)
    mean, std = torch.tensor(mean, device=x.device), torch.tensor(std, device=x.device)
    return (x - mean[:, None, None]) / std[:, None, None]


def _projected(features):
    """transformers 4 returns the projected embedding; 5 returns an output whose pooler_output is it."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ClipScorer(nn.Module):
    """Image and text embeddings of a transformers CLIPModel, batched; scores by `head`."""

    def __init__(self, model, tokenizer, size, mean, std, head):
        super().__init__()
        self.model, self.tokenizer, self.head = model.eval().requires_grad_(False), tokenizer, head
        self.size, self.mean, self.std = size, mean, std
        self.lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once

    @torch.no_grad()
    def forward(self, images, prompts):
        with self.lock:
            return self._score(images, prompts)

    def _score(self, images, prompts):
        device = next(self.model.parameters()).device
        pixels = clip_preprocess(images.to(device), self.size, self.mean, self.std)  # (B, 3, S, S)
        image = F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)), dim=-1)  # (B, E)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = F.normalize(_projected(self.model.get_text_features(**tokens.to(device))), dim=-1)  # (B, E)
        return self.head(self, image, text).float().to(images.device)  # (B,)


def load_clip_scorer(model_id: str, processor_id: str, device, head) -> ClipScorer:
    """Load a CLIPModel and its processor's tokenizer and normalisation from the hub or a directory."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(model_id).to(device)
        tokenizer = AutoTokenizer.from_pretrained(processor_id)
        proc = CLIPImageProcessor.from_pretrained(processor_id)
    except OSError as err:
        raise RuntimeError(
            f"could not load {model_id!r} / {processor_id!r}: {err}. Without the hub, pre-download it into "
            f"the Hugging Face cache and set HF_HUB_OFFLINE=1, or use an offline reward: {', '.join(OFFLINE_REWARDS)}"
        ) from err
    crop = proc.crop_size  # a dict (transformers 4), a SizeDict (5) or an int (old configs)
    size = crop if isinstance(crop, int) else crop["height"]
    return ClipScorer(model, tokenizer, size, proc.image_mean, proc.image_std, head)


def pickscore_head(scorer, image, text):
    """PickScore: logit_scale.exp() * cos(image, text), divided by 26 as Flow-GRPO (~0.8-0.9)."""
    return scorer.model.logit_scale.exp() * (image * text).sum(-1) / 26


def clipscore_head(scorer, image, text):
    """CLIPScore (Hessel et al.): 2.5 * max(cos(image, text), 0); range [0, 2.5], typically 0.5-0.9."""
    return 2.5 * (image * text).sum(-1).clamp_min(0)


def pickscore(device="cpu", threads=0):
    """PickScore_v1 (CLIP-H, 3.9 GB download); range about [0.7, 1] after the 1/26 scaling."""
    return load_clip_scorer(
        "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device, pickscore_head
    )


def clipscore(device="cpu", threads=0):
    """CLIP ViT-L/14 (1.7 GB download) CLIPScore; see clipscore_head for the range."""
    return load_clip_scorer("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14", device, clipscore_head)


class AestheticMLP(nn.Module):
    """LAION aesthetic predictor v2 head (linear-MSE variant) on normalised CLIP ViT-L/14 image embeddings."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding):
        return self.layers(embedding).squeeze(-1)  # (B,)


def aesthetic(
    device="cpu", threads=0, repo="camenduru/improved-aesthetic-predictor", filename="sac+logos+ava1-l14-linearMSE.pth"
):
    """LAION aesthetic v2: a 1-10 score divided by 10, range about [0.3, 0.8]. CLIP-L + 3.7 MB head."""
    from huggingface_hub import hf_hub_download

    try:
        state = torch.load(hf_hub_download(repo, filename), map_location="cpu", weights_only=True)
    except Exception as err:  # the hub raises several types when offline
        raise RuntimeError(
            f"could not load the aesthetic head {repo}/{filename}: {err}. Offline rewards: {', '.join(OFFLINE_REWARDS)}"
        ) from err
    mlp = AestheticMLP().eval().requires_grad_(False).to(device)
    mlp.load_state_dict(state)
    head = lambda scorer, image, text: mlp(image) / 10
    return load_clip_scorer("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14", device, head)


# ------------------------------------------------------------------------------------------------
# GenEval-style compositional reward on solid-shape scenes (shapes.py): offline, on the CPU.
# Recognition (v3) is calibrated on pictures the shapes model drew, each labelled pass / fail by
# annotators who looked at it (shapes_labels.py; RESULTS.md, "The labelled set"): thresholds tuned
# on the set's calibration half only, agreement reported on its test half. Nothing here depends on the
# renderer's size range: sizes are in pixels and in shares of the image side.
# ------------------------------------------------------------------------------------------------

# Hue bands (degrees) of the four named colours; a pixel joins one only when clearly saturated, so
# black, white and grey backgrounds (and anti-aliased dark edges) belong to none.
HUE_BANDS = {"red": ((0, 20), (335, 360)), "yellow": ((38, 75),), "green": ((85, 170),), "blue": ((195, 265),)}

SPECK = 4  # pixels: a coloured piece of at most this many pixels is a speck, ignored (a 2 x 2 dot)
MIN_PIXELS = 5  # a shape needs 5 pixels across to be told apart: 16 % of a 32 px side, 8 % of a 64 px side
MIN_SHARE = 0.05  # ... and 5 % of the image side, so that the floor grows with larger images
CORE = 0.52  # a pixel belongs to a shape when more than half covered: chroma > half the shape's (a 50 % fringe is out)
MAX_ASPECT = 1.4  # box at most 1.4 times as long as wide (the grammar's shapes are as wide as tall)
MIN_SOLIDITY = 0.72  # area / convex hull: an L, plus or T fills at most 0.714 of its hull, drawn triangles 0.7-0.92
TRIANGLE_TAPER = 2.5  # a triangle's wide end is at least 2.5 times its narrow end (thirds of the profile)
TRIANGLE_FIT = 0.62  # ... and it overlaps its ideal form (IoU) at least this much
SQUARE_EXTENT = 0.78  # a square fills at least 78 % of its box (drawn squares have soft corners) ...
SQUARE_MARGIN = 0.05  # ... and fills it more than a disk fits it, less this margin (small pixelated circles)
CIRCLE_FIT = 0.76  # a circle overlaps the disk of its area at its centroid (IoU) at least this much
SPLIT_STEPS = (1, 2, 3)  # erosions tried, in order, to split touching shapes


def color_layers(arr) -> tuple[np.ndarray, dict]:
    """(H, W, 3) uint8 -> (chroma (H, W) in [0, 1], {colour: (H, W) bool}): saturated pixels
    (chroma > 0.25, value > 0.3) by hue band."""
    rgb = arr.astype(np.float32) / 255
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    saturated = (chroma > 0.25) & (mx > 0.3)
    masks = {
        name: saturated & np.any([(hue >= lo) & (hue < hi) for lo, hi in bands], axis=0)
        for name, bands in HUE_BANDS.items()
    }
    return chroma, masks


def ideal_forms(h: int, w: int) -> dict:
    """The ideal filled forms fitted to an (h, w) box, sampled at pixel centres: {name: (h, w) bool}.
    circle: the inscribed ellipse; square: the whole box; triangle: apex at the top centre, base
    along the bottom edge (as the renderer draws it)."""
    y, x = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None]  # (h, w) each, in [0, 1]
    return {
        "circle": (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1,
        "square": np.ones((h, w), bool),
        "triangle": np.abs(2 * x - 1) <= y,
    }


def iou(a, b) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def hull_area(crop) -> float:
    """Area of the convex hull of a crop's pixels as unit squares (their corners): exact for a box."""
    ys, xs = np.nonzero(crop)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return float(cv2.contourArea(cv2.convexHull(corners.astype(np.float32))))


def taper(crop) -> float:
    """How much a crop narrows along rows or columns: the mean width of its wider end third over that
    of its narrower end third, the larger of the two directions (>= 1; a triangle 3-7, a disk ~1.1)."""
    best = 1.0
    for profile in (crop.sum(1), crop.sum(0)):  # widths of the rows, heights of the columns
        k = max(1, len(profile) // 3)
        a, b = profile[:k].mean(), profile[-k:].mean()
        best = max(best, max(a, b) / max(min(a, b), 0.5))
    return float(best)


def disk_fit(crop) -> float:
    """Overlap (IoU) of a crop (h, w) bool with the disk of its area at its centroid: a pixelated
    circle 0.94-1 (an octagon or a rounded diamond too), a ragged or lobed blob 0.64-0.74."""
    h, w = crop.shape
    ys, xs = np.nonzero(crop)
    cy, cx, r = ys.mean() + 0.5, xs.mean() + 0.5, math.sqrt(crop.sum() / math.pi)
    pad = math.ceil(r)  # the disk may reach past the box
    y, x = np.mgrid[-pad : h + pad, -pad : w + pad] + 0.5
    padded = np.pad(crop, pad)
    return iou(padded, (y - cy) ** 2 + (x - cx) ** 2 <= r * r)


def shape_measures(crop) -> dict:
    """What recognise_shape reads from one piece's box crop (h, w) bool: box aspect, solidity (area /
    convex hull), taper, and how well each form fits: circle (disk_fit), square (extent: area / box),
    triangle (IoU with the ideal triangle of the box in the best of its four orientations)."""
    h, w = crop.shape
    upright = ideal_forms(h, w)["triangle"]
    turned = ideal_forms(w, h)["triangle"].T  # apex on the left
    return dict(
        aspect=max(h, w) / min(h, w),
        solidity=float(crop.sum()) / max(hull_area(crop), 1.0),
        taper=taper(crop),
        circle=disk_fit(crop),
        square=float(crop.sum()) / (h * w),
        triangle=max(iou(crop, t) for t in (upright, upright[::-1], turned, turned[:, ::-1])),
    )


def recognise_shape(crop, min_side: float = MIN_PIXELS) -> str:
    """circle | square | triangle for one piece's box crop (h, w) bool that a person would name so;
    "small" when its box is under min_side pixels across; "other" for anything else (a bar, an L /
    plus / T, a lump or a ragged blob). Of the forms whose fit clears its threshold (a triangle also
    narrows: taper), the best fitting names it. Thresholds: the module's constants, tuned on the
    labelled set's calibration half (RESULTS.md)."""
    if max(crop.shape) < min_side:
        return "small"
    m = shape_measures(crop)
    if m["aspect"] > MAX_ASPECT:
        return "other"
    solid = m["solidity"] >= MIN_SOLIDITY
    cleared = {
        "circle": solid and m["circle"] >= CIRCLE_FIT,
        "square": solid and m["square"] >= SQUARE_EXTENT and m["square"] >= m["circle"] - SQUARE_MARGIN,
        "triangle": solid and m["taper"] >= TRIANGLE_TAPER and m["triangle"] >= TRIANGLE_FIT,
    }
    named = [name for name, ok in cleared.items() if ok]
    bonus = {"square": SQUARE_MARGIN}  # a square's extent is measured against a disk's fit less the margin
    return max(named, key=lambda name: m[name] + bonus.get(name, 0)) if named else "other"


def _box(mask) -> tuple:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def _crop(mask, box):
    left, top, w, h = box
    return mask[top : top + h, left : left + w]


def _piece(mask, min_side: float) -> tuple:
    """One piece (H, W) bool as (box (left, top, w, h), crop (h, w) bool, recognise_shape's name)."""
    box = _box(mask)
    crop = _crop(mask, box)
    return box, crop, recognise_shape(crop, min_side)


def _erosion_split(piece, min_side: float) -> list | None:
    """Erode (one, two, three steps of a 3 x 3 cross) until the piece falls apart into two or more
    cores; every pixel goes to its nearest core. The parts (as _piece) when each is a named shape,
    else None."""
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    for steps in SPLIT_STEPS:
        eroded = cv2.erode(piece.astype(np.uint8), kernel, iterations=steps)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(eroded, connectivity=4)
        cores = [labels == i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= 2]
        if len(cores) < 2:
            continue
        distance = np.stack([cv2.distanceTransform((~c).astype(np.uint8), cv2.DIST_L2, 3) for c in cores])
        parts = [_piece(piece & (distance.argmin(0) == i), min_side) for i in range(len(cores))]
        if all(shape in shapes.SHAPES for *_, shape in parts):
            return parts
    return None


def split_touching(piece, min_side: float) -> list:
    """Touching shapes of one colour as separate pieces, each (box, crop, name) as _piece: a piece that
    is no shape whole is split by erosion (_erosion_split: two circles joined by a neck, triangles
    touching at a corner); a split counts only when every part is a named shape. A piece that does
    not split so is returned whole: a fused lump stays one. (Cutting across a piece's narrowest waist
    was tried too: on the labelled set's calibration half it passed more fused lumps than it found
    touching shapes, 0.858 against 0.872 agreement.)"""
    whole = _piece(piece, min_side)
    if whole[2] in shapes.SHAPES:
        return [whole]
    return _erosion_split(piece, min_side) or [whole]


def components(arr) -> list:
    """The coloured pieces of one image (H, W, 3) uint8, each [colour, box (left, top, w, h), crop (h, w)
    bool, shape]: per colour, each 8-connected component (OpenCV) keeps its core (pixels of at least
    CORE times its 90th-percentile chroma: a pale fringe is no part of a shape), whose pieces above a
    speck are split where shapes touch and named (split_touching, recognise_shape)."""
    min_side = max(MIN_PIXELS, MIN_SHARE * arr.shape[0])
    chroma, masks = color_layers(arr)
    found = []
    for color, mask in masks.items():
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        for i in range(1, count):
            component = labels == i
            if component.sum() <= SPECK:
                continue
            core = component & (chroma >= CORE * np.quantile(chroma[component], 0.9))
            n, pieces, stats, _ = cv2.connectedComponentsWithStats(core.astype(np.uint8), connectivity=8)
            for j in range(1, n):
                if stats[j, cv2.CC_STAT_AREA] > SPECK:
                    found += [(color, *part) for part in split_touching(pieces == j, min_side)]
    return found


def find_objects(arr) -> tuple[list, int]:
    """Solid objects of the four colours in one image (H, W, 3) uint8: ([(colour, shape, box centre
    (x, y))], number of unrecognised pieces above a speck: clutter)."""
    comps = components(arr)
    return named_objects(comps), sum(shape not in shapes.SHAPES for *_, shape in comps)


def named_objects(comps: list) -> list:
    """The `components` that have a shape's name, as (colour, shape, box centre (x, y)) (GenEval's boxes)."""
    return [
        (color, shape, (left + w / 2, top + h / 2))
        for color, (left, top, w, h), _, shape in comps
        if shape in shapes.SHAPES
    ]


def shapes_requirements(scene, objects, size: int) -> list[bool]:
    """GenEval's strict rule (its `evaluate`) on a prompt's parsed Scene (shapes.parse_prompt), as a
    list of requirements, each met or not. Per thing: an object of its shape; of its shape and colour;
    for counting prompts, exactly N of the shape (no extra of the counted kind: GenEval's exclude
    clause) and exactly N of the shape and colour. For position prompts: some pair of the two things
    stands in the relation (shapes.relation_holds, by box centres)."""
    requirements, matches = [], []
    for thing in scene.things:
        of_shape = [o for o in objects if o[1] == thing.shape]
        exact = [o[2] for o in of_shape if o[0] == thing.color]
        requirements += [len(of_shape) > 0, len(exact) > 0]
        if scene.counted:
            requirements += [len(of_shape) == thing.count, len(exact) == thing.count]
        matches.append(exact)
    if scene.relation:
        a, b = matches
        requirements.append(any(shapes.relation_holds(scene.relation, p, q, size) for p in a for q in b))
    return requirements


def include_clauses(scene) -> list[dict]:
    """GenEval's include clauses of a Scene: {shape, count, color[, position (relation, target index)]}.
    Decision (the grammar has colours where GenEval's position prompts have none): every clause
    carries its colour. A position prompt "A rel B" lists B first and A with (rel, 0), as GenEval."""
    clauses = [dict(shape=t.shape, count=t.count, color=t.color) for t in scene.things]
    if scene.relation:
        a, b = clauses
        clauses = [b, {**a, "position": (scene.relation, 0)}]
    return clauses


def graded_score(scene, objects, size: int) -> float:
    """Flow-GRPO's graded GenEval training score (yifan123/reward-server, gen_eval.py, evaluate_reward,
    at 7131478 / 92ac29f) on recognised objects: per include clause, 1 - |count - found| / count for the
    count; if the count is wrong, one 0 for colour and position; else the colour share 1 - |count -
    right colour| / count, and if the colours are right and the clause has a position, 1 or 0 for the
    relation (0 when its target clause failed). The score is the mean of that list; exclude clauses
    are ignored. Decisions where the grammar leaves GenEval: (a) two clauses of one shape (a red and a
    blue circle): a clause's found objects are those of its shape not of another such clause's colour;
    (b) the count term is clipped at 0 (the server's goes negative past twice the count, and Eq. 11's
    weights want rewards >= 0); (c) a failed relation adds one 0 (the server at 7131478 also appends a
    1 after it, its append sits after the loop: 5/6 instead of 4/5 for a wrong side)."""
    clauses, scores, matched = include_clauses(scene), [], []
    for c in clauses:
        others = {o["color"] for o in clauses if o is not c and o["shape"] == c["shape"] and o["color"] != c["color"]}
        found = [o for o in objects if o[1] == c["shape"] and o[0] not in others]
        scores.append(max(0.0, 1 - abs(c["count"] - len(found)) / c["count"]))
        if len(found) != c["count"]:
            scores.append(0.0)
            matched.append(None)
            continue
        right = sum(o[0] == c["color"] for o in found)
        scores.append(1 - abs(c["count"] - right) / c["count"])
        ok = right == c["count"]
        if ok and "position" in c:
            relation, target = c["position"]
            pairs = [(o, t) for o in found for t in (matched[target] or [])]
            ok = bool(pairs) and all(shapes.relation_holds(relation, o[2], t[2], size) for o, t in pairs)
            scores.append(float(ok))
        matched.append(found if ok else None)
    return sum(scores) / len(scores)


def geneval_shapes(device="cpu", threads=0):
    """GenEval's strict score on shapes.py scenes, in {0, 1}: 1 when every requirement of the prompt
    holds (shapes_requirements: objects, colours, counts with no extra of the counted kind, relation)
    and the scene is clean (no coloured piece above a speck that is not a recognised shape). The
    evaluation metric. Offline."""

    def reward_fn(images, prompts):
        scenes = [shapes.parse_prompt(p)[1] for p in prompts]  # every prompt checked before any work
        scores = []
        for arr, scene in zip(to_uint8(images), scenes, strict=True):
            objects, unrecognised = find_objects(arr)
            scores.append(float(all(shapes_requirements(scene, objects, arr.shape[0])) and unrecognised == 0))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    return reward_fn


def geneval_shapes_score(device="cpu", threads=0):
    """Flow-GRPO's graded GenEval training score (graded_score) on shapes.py scenes, in [0, 1], with
    the strict score's recognition; clutter neither earns nor costs. The training reward. Offline."""

    def reward_fn(images, prompts):
        scenes = [shapes.parse_prompt(p)[1] for p in prompts]
        scores = [
            graded_score(s, find_objects(a)[0], a.shape[0]) for a, s in zip(to_uint8(images), scenes, strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    return reward_fn


# ------------------------------------------------------------------------------------------------
# Registry and mixes
# ------------------------------------------------------------------------------------------------

REWARDS = {
    "ocr": ocr,
    "pickscore": pickscore,
    "clipscore": clipscore,
    "aesthetic": aesthetic,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "geneval_shapes": geneval_shapes,
    "geneval_shapes_score": geneval_shapes_score,
}


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """'ocr' -> [('ocr', 1.0)]; 'ocr:1.0,pickscore:0.5' -> [('ocr', 1.0), ('pickscore', 0.5)]."""
    parts = []
    for item in spec.split(","):
        name, colon, weight = (part.strip() for part in item.partition(":"))
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; choose from {sorted(REWARDS)}")
        if colon and not weight:
            raise ValueError(f"reward {name!r} in {spec!r} has an empty weight after ':'")
        try:
            value = float(weight) if colon else 1.0
        except ValueError:
            raise ValueError(f"reward weight {weight!r} of {name!r} in {spec!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"reward weight {weight!r} of {name!r} in {spec!r} is not finite")
        parts.append((name, value))
    return parts


def load_reward(spec: str, device="cpu", threads: int = 0):
    """A reward function for `spec`: sum_i weight_i * reward_i(images, prompts), checked inputs.
    threads: CPU threads of one call of a CPU reward (OCR); 0: one per core."""
    parts = [(REWARDS[name](device, threads), weight) for name, weight in parse_spec(spec)]

    def reward_fn(images, prompts):
        check_inputs(images, prompts)
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)  # (B,)
        for fn, weight in parts:
            total = total + weight * fn(images, prompts).to(total.device)
        return total

    reward_fn.__name__ = spec
    return reward_fn
