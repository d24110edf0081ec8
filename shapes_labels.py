"""The shapes benchmark's labelled set: the shapes model's own pictures, each labelled pass/fail by
annotators who looked at it, against which the shapes reward is calibrated and tested.

    python shapes_labels.py sample      # draw the pictures: results/labels/images.npz, samples.json
    python shapes_labels.py sheets      # contact sheets to label from: results/labels/sheets/
    python shapes_labels.py zoom 12 40  # a labeller's 12x copies of pictures 12 and 40: /tmp/zoom/
    python shapes_labels.py merge       # raw/A.json, B.json (and C.json on disagreements) -> labels.json
    python shapes_labels.py agreement   # the reward against the labels: results/labels/agreement.md
    python shapes_labels.py frontier    # agreement against images built to fool it, per threshold
    python shapes_labels.py base        # the base model under the reward: results/labels/base_v3.md
    python shapes_labels.py trained --out results/labels_trained  # the demo's trained policies' pictures
    python shapes_labels.py trained_report --out results/labels_trained  # their labels against the reward

The labels themselves (results/labels/labels.json) were written by annotators looking at the sheets
(assistant agents with a fresh context, blind to each other and to any reward), never by a program,
under the rules in results/labels/RULES.md. The set is split once, before any tuning, into a
calibration half and a test half (samples.json, "split"); the reward is tuned on the calibration
half only.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import backends
import rewards
import runs
import shapes
import shapes_model
import vgpo

OUT = os.path.join("results", "labels")
RUN_DIRS = ("results/shapes_low/shapes_runs", "results/shapes_mid/shapes_runs")  # trained LoRAs
BASE_ODE, BASE_SDE, LORA_OWN, LORA_HELD = 48, 16, 8, 4  # pictures per category / per LoRA


def _draw(backend, prompts, seed: int, sde: bool, gen=None, steps: int = 20, chunk: int = 64) -> np.ndarray:
    """(B, 32, 32, 3) uint8 samples of the backend's current weights: ODE `steps` steps in chunks (the
    evaluation's sampler) or the training sampler (SDE, 10 steps, the preset's noise level); noise from
    `gen`, by default a stream of `seed` no run or evaluation uses."""
    kept = []

    def keep(images, batch_prompts):
        kept.extend(rewards.to_uint8(images))
        return torch.zeros(len(batch_prompts))

    gen = gen or vgpo.make_generator(seed, 7)
    if sde:
        vgpo.rollout(backend, prompts, backend.sigmas(10), backend.config.noise_level, keep, gen, instant=False)
    else:
        vgpo.evaluate(backend, keep, prompts, steps, gen, chunk)
    return np.stack(kept)


def sample(args) -> None:
    """The base model on held-out prompts of the four categories (ODE and SDE, new noise) and every
    trained LoRA in RUN_DIRS on its own prompts and on held-out two-object and position prompts;
    shuffled once, split once (calibration / test, alternating within each category)."""
    rng = np.random.default_rng(20261204)
    config = vgpo.Config(model="shapes", shapes_prompts="grammar", seed=0)
    backend = vgpo.build_backend(config)
    held = shapes.held_out_prompts()
    images, records = [], []

    def add(arrs, prompts, source, sampler):
        images.extend(arrs)
        records.extend(dict(prompt=p, source=source, sampler=sampler) for p in prompts)

    for i, pool in enumerate(held.values()):
        for n, sde in ((BASE_ODE, False), (BASE_SDE, True)):
            prompts = list(rng.choice(pool, n))
            add(_draw(backend, prompts, 100 + 2 * i + sde, sde), prompts, "base", "sde10" if sde else "ode20")
    loras = sorted(os.path.join(d, f) for d in RUN_DIRS if os.path.isdir(d) for f in os.listdir(d))
    for j, path in enumerate(p for p in loras if p.endswith(".lora.safetensors")):
        runs.load_lora(backend, path)
        name = os.path.relpath(path, "results").removesuffix(".lora.safetensors").replace("/shapes_runs/", "/")
        with open(path.removesuffix(".lora.safetensors") + ".json") as f:
            own = backends.shapes_prompt_list(json.load(f)["shapes_prompts"])
        prompts = list(rng.choice(own, LORA_OWN))
        prompts += list(rng.choice(held["two objects"], LORA_HELD // 2)) + list(rng.choice(held["position"], 2))
        add(_draw(backend, prompts, 200 + j, False), prompts, name, "ode20")
    order = rng.permutation(len(images))
    images = np.stack(images)[order]
    records = [records[i] for i in order]
    seen = {}
    for k, r in enumerate(records):
        r["id"], r["category"] = k, shapes.parse_prompt(r["prompt"])[0]
        seen[r["category"]] = seen.get(r["category"], -1) + 1
        r["split"] = "calibration" if seen[r["category"]] % 2 == 0 else "test"
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "images.npz"), images=images)
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(records, f, indent=0)
    print(f"{len(images)} pictures -> {args.out}")


def load(out: str = OUT) -> tuple[np.ndarray, list]:
    """(images (N, 32, 32, 3) uint8, records [{id, prompt, category, source, sampler, split, ...}]),
    with each record's label merged in when labels.json exists."""
    images = np.load(os.path.join(out, "images.npz"))["images"]
    with open(os.path.join(out, "samples.json")) as f:
        records = json.load(f)
    path = os.path.join(out, "labels.json")
    if os.path.exists(path):
        with open(path) as f:
            labels = json.load(f)
        for r in records:
            r.update(labels.get(str(r["id"]), {}))
    return images, records


def contact_sheet(images, captions, path: str, cols: int = 4, scale: int = 6, caption_h: int = 44) -> None:
    """A PNG of images (n, h, w, 3) uint8, each scaled `scale` times (nearest) above its caption
    (caption_h pixels: 44 is what the annotators' sheets had)."""
    h, w = images.shape[1:3]
    cell_w, cell_h = w * scale + 12, h * scale + caption_h
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (235, 235, 235))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=13)
    for i, (arr, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % cols) * cell_w + 6, (i // cols) * cell_h + 4
        sheet.paste(Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST), (x, y))
        draw.multiline_text((x, y + h * scale + 2), textwrap.fill(caption, 30), fill=(0, 0, 0), font=font)
    sheet.save(path)


def sheets(args) -> None:
    """Contact sheets of 16 pictures in id order, each under '#id: prompt' (no source, no reward)."""
    images, records = load(args.out)
    os.makedirs(os.path.join(args.out, "sheets"), exist_ok=True)
    for s in range(0, len(images), 16):
        part = records[s : s + 16]
        captions = [f"#{r['id']}: " + r["prompt"].removeprefix("a photo of ") for r in part]
        contact_sheet(images[s : s + 16], captions, os.path.join(args.out, "sheets", f"sheet_{s // 16:02d}.png"))
    print(f"{-(-len(images) // 16)} sheets -> {args.out}/sheets")


def merge(args) -> None:
    """labels.json from the two annotators' files (raw/A.json, raw/B.json: {id: {pass, confidence,
    reason}}, each blind to the other) and, where they disagree, a third annotator's (raw/C.json)."""
    raw = {}
    for who in ("A", "B", "C"):
        path = os.path.join(args.out, "raw", f"{who}.json")
        if os.path.exists(path):
            with open(path) as f:
                raw[who] = json.load(f)
    _, records = load(args.out)
    labels, missing = {}, []
    for r in records:
        key = str(r["id"])
        a, b = raw["A"].get(key), raw["B"].get(key)
        if a is None or b is None:
            missing.append(key)
            continue
        if a["pass"] == b["pass"]:
            sure = "sure" if a["confidence"] == b["confidence"] == "sure" else "unsure"
            reason = a["reason"] or b["reason"]
            labels[key] = dict(label=a["pass"], confidence=sure, reason=reason, votes=[a["pass"], b["pass"]])
        elif key in raw.get("C", {}):
            c = raw["C"][key]
            reason = c["reason"] or (a if not a["pass"] else b)["reason"]
            labels[key] = dict(
                label=c["pass"], confidence="unsure", reason=reason, votes=[a["pass"], b["pass"], c["pass"]]
            )
        else:
            missing.append(key)
    with open(os.path.join(args.out, "labels.json"), "w") as f:
        json.dump(labels, f, indent=0)
    print(f"{len(labels)} labels, {len(missing)} missing (disagreements without a third label: {missing[:20]})")


def kappa(x, y) -> float:
    """Cohen's kappa of two lists of booleans."""
    x, y = np.asarray(x, bool), np.asarray(y, bool)
    observed = (x == y).mean()
    chance = x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean())
    return float((observed - chance) / (1 - chance)) if chance < 1 else 1.0


def as_batch(images) -> torch.Tensor:
    """Pictures (N, H, W, 3) uint8 (an array or a list) as the rewards' input (N, 3, H, W) in [0, 1]."""
    return torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def verdicts(images, records, reward=None) -> np.ndarray:
    """The strict reward's pass/fail (N,) bool on the labelled pictures."""
    reward = reward or rewards.load_reward("geneval_shapes")
    return reward(as_batch(images), [r["prompt"] for r in records]).numpy() > 0.5


def confusion(labels, passed) -> str:
    both = lambda lab, rew: int(((labels == lab) & (passed == rew)).sum())  # noqa: E731
    return (
        "| | reward passes | reward fails |\n|---|---|---|\n"
        f"| label pass | {both(True, True)} | {both(True, False)} |\n"
        f"| label fail | {both(False, True)} | {both(False, False)} |\n"
    )


def agreement(args) -> None:
    """The strict reward against the labels, per split and category: agreement.md, and contact sheets of
    the test half's disagreements (disagreements_test.png) under label, reward and the label's reason."""
    images, records = load(args.out)
    keep = [i for i, r in enumerate(records) if "label" in r]
    images, records = images[keep], [records[i] for i in keep]
    labels = np.array([r["label"] for r in records])
    passed = verdicts(images, records)
    lines = [
        "`python shapes_labels.py agreement`: the strict reward (rewards.geneval_shapes) against the labels.\n",
        "| split | category | pictures | labels pass | reward passes | agreement | Cohen's kappa |",
        "|---|---|---|---|---|---|---|",
    ]
    for split in ("calibration", "test"):
        for category in (*shapes.CATEGORIES, "all"):
            idx = [i for i, r in enumerate(records) if r["split"] == split and category in (r["category"], "all")]
            lab, rew = labels[idx], passed[idx]
            cells = [
                len(idx),
                f"{lab.mean():.2f}",
                f"{rew.mean():.2f}",
                f"{(lab == rew).mean():.3f}",
                f"{kappa(lab, rew):.2f}",
            ]
            lines.append(f"| {split} | {category} | " + " | ".join(map(str, cells)) + " |")
    for split in ("calibration", "test"):
        idx = [i for i, r in enumerate(records) if r["split"] == split]
        lines += [f"\nConfusion, {split} half:\n", confusion(labels[idx], passed[idx])]
    wrong = [i for i, r in enumerate(records) if r["split"] == "test" and labels[i] != passed[i]]
    if wrong:
        captions = [
            f"#{records[i]['id']}: {records[i]['prompt'].removeprefix('a photo of ')} | label "
            + ("pass" if labels[i] else f"fail ({records[i]['reason']})")
            + (" | reward pass" if passed[i] else " | reward fail")
            for i in wrong
        ]
        contact_sheet(images[wrong], captions, os.path.join(args.out, "disagreements_test.png"), cols=5, caption_h=62)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "agreement.md"), "w") as f:
        f.write(text)
    print(text)


def base(args) -> None:
    """The shipped base model under the v3 reward: strict accuracy per category on held-out prompts
    (shapes_model.evaluate's prompts, noise and sampler), the graded training score, and how often the
    reward server's count term would go negative (more than twice a clause's count found): base_v3.md."""
    unet, encoder = shapes_model.load("shapes_base.safetensors")
    strict, graded = rewards.load_reward("geneval_shapes"), rewards.load_reward("geneval_shapes_score")
    rows, over = [], 0
    for category, pool in shapes.held_out_prompts().items():
        prompts = [pool[i % len(pool)] for i in range(args.per_category)]
        images = torch.cat(
            [shapes_model.sample(unet, encoder, prompts[i : i + 64], seed=i) for i in range(0, len(prompts), 64)]
        )
        s, g = strict(images, prompts), graded(images, prompts)
        for arr, prompt in zip(rewards.to_uint8(images), prompts, strict=True):
            objects = rewards.find_objects(arr)[0]
            clauses = rewards.include_clauses(shapes.parse_prompt(prompt)[1])
            over += any(sum(o[1] == c["shape"] for o in objects) > 2 * c["count"] for c in clauses)
        rows.append((category, s.mean().item(), g.mean().item()))
    overall = sum(r[1] for r in rows) / len(rows)
    text = (
        f"`python shapes_labels.py base --per_category {args.per_category}`: shapes_base.safetensors, held-out "
        "prompts, "
        "ODE 20 steps, guidance 4.5 (shapes_model.evaluate's samples), reward v3.\n\n"
        "| category | strict accuracy | graded score |\n|---|---|---|\n"
        + "".join(f"| {c} | {a:.3f} | {g:.3f} |\n" for c, a, g in rows)
        + f"| overall (mean of categories) | {overall:.3f} | |\n\n"
        f"Pictures where a clause finds more than twice its count (the server's score would go negative): "
        f"{over} of {len(rows) * args.per_category}.\n"
    )
    with open(os.path.join(args.out, "base_v3.md"), "w") as f:
        f.write(text)
    print(text)
    base_grid(unet, encoder, os.path.join("results", "shapes", "base_samples.png"))


def base_grid(unet, encoder, path: str) -> None:
    """The base model on 24 held-out prompts (the categories interleaved, seed 1), each under its strict reward."""
    held = shapes.held_out_prompts().values()
    prompts = [p for group in zip(*held, strict=False) for p in group][:24]
    images = shapes_model.sample(unet, encoder, prompts, seed=1)
    runs.save_samples(images, path, prompts, rewards.load_reward("geneval_shapes")(images, prompts), limit=24)


FRONTIER = {  # each threshold of rewards.py varied alone around the chosen value
    "CORE": (0.4, 0.5, 0.52, 0.6, 0.7),
    "MIN_SOLIDITY": (0.68, 0.72, 0.76, 0.8),
    "CIRCLE_FIT": (0.72, 0.76, 0.8, 0.84),
    "TRIANGLE_TAPER": (2.0, 2.25, 2.5, 2.75),
    "TRIANGLE_FIT": (0.58, 0.62, 0.66, 0.7),
    "SQUARE_EXTENT": (0.74, 0.78, 0.82),
    "SQUARE_MARGIN": (0.0, 0.05, 0.1, 0.15),
    "MIN_PIXELS": (4, 5, 6, 7),
    "MAX_ASPECT": (1.3, 1.4, 1.5),
}


def frontier(args) -> None:
    """Agreement with the labels on the calibration half against the share of images built to fool it
    that pass (the worst family, 50 each, 32 and 64 px, two draws), each threshold varied alone:
    frontier.md. The test half is not read."""
    images, records = load(args.out)
    cal = [i for i, r in enumerate(records) if r["split"] == "calibration"]
    labels = np.array([records[i]["label"] for i in cal])
    fooling = []
    for size in (32, 64):
        for draw in (0, 1):
            items = shapes.fooling_images(size, np.random.default_rng(100 + draw), per_family=50)
            batch = as_batch([image for _, image, _ in items])
            fooling.append((batch, [p for *_, p in items], np.array([f for f, _, _ in items])))
    strict = rewards.load_reward("geneval_shapes")

    def measure():
        passed = verdicts(images[cal], [records[i] for i in cal], strict)
        worst = 0.0
        for batch, prompts, families in fooling:
            fooled = strict(batch, prompts).numpy()
            worst = max(worst, max(fooled[families == f].mean() for f in shapes.FOOLING_FAMILIES))
        return (passed == labels).mean(), kappa(labels, passed), worst

    rows = ["| threshold | value | calibration agreement | kappa | worst family fooled |", "|---|---|---|---|---|"]
    for name, values in FRONTIER.items():
        chosen = getattr(rewards, name)
        for value in values:
            setattr(rewards, name, value)
            agree, k, worst = measure()
            mark = " (chosen)" if value == chosen else ""
            rows.append(f"| {name} | {value}{mark} | {agree:.3f} | {k:.2f} | {worst:.2f} |")
        setattr(rewards, name, chosen)
    text = "`python shapes_labels.py frontier`: each threshold of rewards.py varied alone.\n\n" + "\n".join(rows) + "\n"
    with open(os.path.join(args.out, "frontier.md"), "w") as f:
        f.write(text)
    print(text)


DEMO = os.path.join("results", "shapes_demo")  # `experiments.py demo --out DEMO`: records in DEMO/demo_runs,
# run directories (checkpoints) in runs/shapes_demo/<DEMO's last folder>


def _evaluation_pictures(backend, config, n: int) -> tuple[np.ndarray, list]:
    """The first n pictures of the run's evaluation (its prompts, noise, sampler and chunks) and their prompts."""
    prompts = backend.eval_prompts(config.eval_samples)[:n]
    gen, chunk = vgpo.make_generator(config.seed, 2), config.prompts_per_iteration * config.group_size
    return _draw(backend, prompts, config.seed, False, gen, config.eval_steps, chunk), prompts  # evaluate_run's


def _trained_run(args, method: str, seed: int) -> tuple[dict, vgpo.Config, str]:
    """A trained run's record, Config and trained LoRA (a path for runs.load_lora): the demo's (`experiments.py
    demo --out` --demo), or with --grammar OUT a graded-score run of `experiments.py shapes --out OUT` (the whole
    grammar). The LoRA is the run's checkpoint (runs/, float32) where the run directory is still here, else the
    LoRA its record committed beside it (OUT/shapes_runs/NAME.lora.safetensors, rounded to float16: `trained`
    counts any verdict this changes against the run's record); an error names both when neither exists."""
    method = runs.method_file_name(method)  # as experiments.shapes_run_name and demo_run name the runs
    if args.grammar:
        name, folder, kind = f"score_{method}_s{seed}", args.grammar, "shapes_runs"
        runs_root = "shapes"
    else:
        name, folder, kind = f"{method}_s{seed}", args.demo, "demo_runs"
        runs_root = "shapes_demo"
    record_path = os.path.join(folder, kind, name + ".json")
    with open(record_path) as f:
        record = json.load(f)
    fields = {"shapes_prompts": "grammar"} if args.grammar else {}
    config = vgpo.Config(model="shapes", **fields, **record["overrides"], seed=seed, output_dir="")
    checkpoint = os.path.join("runs", runs_root, os.path.basename(os.path.normpath(folder)), name, "checkpoint.pt")
    if os.path.exists(checkpoint):
        return record, config, checkpoint
    committed = os.path.join(folder, kind, name + ".lora.safetensors")
    if not os.path.exists(committed):
        raise FileNotFoundError(f"run {name}: neither its checkpoint {checkpoint} nor a committed LoRA {committed}")
    return record, config, committed


def trained(args) -> None:
    """Pictures of trained policies to label (RL finds a reward's holes): for each seed --from_seed ..
    --seeds - 1 of the demo run with `experiments.py demo --out` --demo (or, with --grammar OUT, of the
    graded-score runs of `experiments.py shapes --out OUT`; the records give the runs' Config overrides),
    the first --per_run evaluation pictures of each of --sources: the base model and methods' trained LoRAs
    (the same prompts and noise), shuffled into --out (images.npz, samples.json; split "test": the reward is never
    tuned on them), appended after the pictures already there (new ids, so that labelled pictures keep
    theirs). The strict verdicts are checked against the runs' records."""
    rng = np.random.default_rng(20261205 + args.from_seed)
    images, records, mismatched = [], [], 0
    strict = rewards.load_reward("geneval_shapes")
    for seed in range(args.from_seed, args.seeds):
        for source in args.sources.split(","):
            record, config, lora = _trained_run(args, "GRPO" if source == "base" else source, seed)
            history = record["history"]
            backend = vgpo.build_backend(config)
            if source != "base":
                runs.load_lora(backend, lora)  # either form
            arrs, prompts = _evaluation_pictures(backend, config, args.per_run)
            recorded = history[0]["eval_scores_before"] if source == "base" else history[-1]["eval_scores"]
            verdict = strict(as_batch(arrs), prompts).numpy()
            mismatched += int((verdict != np.array(recorded[: len(arrs)])).sum())
            images.extend(arrs)
            records += [
                dict(prompt=p, category=shapes.parse_prompt(p)[0], source=source, seed=seed, index=i, split="test")
                for i, p in enumerate(prompts)
            ]
    order = rng.permutation(len(images))
    kept, known = load(args.out) if os.path.exists(os.path.join(args.out, "samples.json")) else (None, [])
    known = [{k: v for k, v in r.items() if k in ("id", "prompt", "category", "source", "seed", "index", "split")}
             for r in known]  # fmt: skip
    records = known + [dict(id=len(known) + k, **records[i]) for k, i in enumerate(order)]
    images = np.stack(images)[order] if kept is None else np.concatenate([kept, np.stack(images)[order]])
    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "images.npz"), images=images)
    with open(os.path.join(args.out, "samples.json"), "w") as f:
        json.dump(records, f, indent=0)
    print(f"{len(images)} pictures -> {args.out}; strict verdicts differing from the runs' records: {mismatched}")


def trained_report(args) -> None:
    """The labels of the trained policies' pictures against the strict reward, per source (base, GRPO,
    VGPO, the ablations): pass rates by label and by reward, agreement and kappa, the before -> after change the
    labels see on the same prompts and noise, and each method against each other on the pictures both were
    labelled on (the same seed, prompt and noise): trained.md."""
    images, records = load(args.out)
    keep = [i for i, r in enumerate(records) if "label" in r]
    images, records = images[keep], [records[i] for i in keep]
    labels, passed = np.array([r["label"] for r in records]), verdicts(images, records)
    rows = [
        "| pictures of | n | labels pass | reward passes | agreement | kappa | reward passes, label fails "
        "| label passes, reward fails |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sources = sorted({r["source"] for r in records}, key=lambda s: (s != "base", s))  # base first
    for source in sources:
        idx = [i for i, r in enumerate(records) if r["source"] == source]
        lab, rew = labels[idx], passed[idx]
        rows.append(
            f"| {source} | {len(idx)} | {lab.mean():.3f} | {rew.mean():.3f} | {(lab == rew).mean():.3f} "
            f"| {kappa(lab, rew):.2f} | {int((rew & ~lab).sum())} | {int((lab & ~rew).sum())} |"
        )
    by_key = {(r["source"], r["seed"], r["index"]): labels[i] for i, r in enumerate(records)}

    def paired(reference, other):  # (seed, index) of the pictures both were labelled on, and their labels
        keys = [(s, i) for (src, s, i) in by_key if src == other and (reference, s, i) in by_key]
        return keys, [by_key[reference, s, i] for s, i in keys], [by_key[other, s, i] for s, i in keys]

    lines = []
    for method in [s for s in sources if s != "base"]:
        keys, before, after = paired("base", method)
        gained, lost, p = runs.mcnemar(before, after)
        per_seed = []
        for seed in sorted({s for s, _ in keys}):
            b = [x for (s, _), x in zip(keys, before, strict=True) if s == seed]
            a = [x for (s, _), x in zip(keys, after, strict=True) if s == seed]
            per_seed.append(f"seed {seed}: {np.mean(b):.3f} -> {np.mean(a):.3f}, p = {runs.mcnemar(b, a)[2]:.2g}")
        lines.append(
            f"- {method}, by the labels, on {len(keys)} paired pictures: {np.mean(before):.3f} -> {np.mean(after):.3f}"
            f" ({gained} gained, {lost} lost, McNemar exact p = {p:.2g}); " + "; ".join(per_seed)
        )
    methods = [s for s in sources if s != "base"]
    for k, reference in enumerate(methods):  # method against method, on the pictures both were labelled on
        for other in methods[k + 1 :]:
            keys, ref, oth = paired(reference, other)
            if not keys:
                continue
            only_other, only_ref, p = runs.mcnemar(ref, oth)
            lines.append(
                f"- {other} against {reference}, by the labels, on the same {len(keys)} pictures (seed, prompt and "
                f"noise): {np.mean(ref):.3f} ({reference}) against {np.mean(oth):.3f} ({other}); {other} alone "
                f"passes {only_other}, {reference} alone {only_ref} (McNemar exact p = {p:.2g})"
            )
    categories = [c for c in shapes.CATEGORIES if any(r["category"] == c for r in records)]
    by_category = []
    if len(categories) > 1:  # the grammar's runs: where the labels and the reward see a change
        by_category = ["| pictures of | " + " | ".join(categories) + " |", "|---" * (len(categories) + 1) + "|"]
        for source in sources:
            cells = []
            for c in categories:
                idx = [i for i, r in enumerate(records) if r["source"] == source and r["category"] == c]
                cells.append(f"{labels[idx].mean():.2f} / {passed[idx].mean():.2f} ({len(idx)})" if idx else "-")
            by_category.append(f"| {source} | " + " | ".join(cells) + " |")
        by_category = ["Per category, labels pass / reward passes (pictures):\n", *by_category, ""]
    text = (
        f"`python shapes_labels.py trained_report --out {args.out}`: trained runs' pictures (base and "
        "trained policies, the runs' own evaluation prompts and noise) labelled by looking, blind to the source "
        "and to any reward, against the strict reward (v3).\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(by_category + lines)
        + "\n"
    )
    with open(os.path.join(args.out, "trained.md"), "w") as f:
        f.write(text)
    print(text)


def zoom(args) -> None:
    """Pictures enlarged 12 times (nearest) to /tmp/zoom/ID.png, for a labeller to look at closely."""
    images, _ = load(args.out)
    os.makedirs("/tmp/zoom", exist_ok=True)
    for i in args.ids:
        Image.fromarray(images[i]).resize((384, 384), Image.NEAREST).save(f"/tmp/zoom/{i}.png")
        print(f"/tmp/zoom/{i}.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = ["sample", "sheets", "zoom", "merge", "agreement", "base", "frontier", "trained", "trained_report"]
    parser.add_argument("what", choices=names)
    parser.add_argument("--per_category", type=int, default=128, help="base: held-out samples per category")
    parser.add_argument("--seeds", type=int, default=2, help="trained: the demo's seeds up to N-1")
    parser.add_argument("--from_seed", type=int, default=0, help="trained: the first seed (appended to --out)")
    parser.add_argument("--per_run", type=int, default=48, help="trained: evaluation pictures per run")
    parser.add_argument("--demo", default=DEMO, help="trained: the demo's --out (its records and run directories)")
    parser.add_argument("--grammar", default="", help="trained: instead of the demo, `experiments.py shapes --out`")
    parser.add_argument("--sources", default="base,GRPO,VGPO", help="trained: e.g. 'TCRM,anchor only'")
    parser.add_argument("ids", nargs="*", type=int, help="zoom: picture ids")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    commands = dict(sample=sample, sheets=sheets, zoom=zoom, merge=merge, agreement=agreement, base=base)
    commands |= dict(frontier=frontier, trained=trained, trained_report=trained_report)
    commands[args.what](args)


if __name__ == "__main__":
    main()
