"""Why two-object prompts fail: the relation error of text-to-image models, split by wording and by axis.

    python 06_stable_diffusion_architecture/relation_analysis.py --models checkpoints/course_t2i
    python 06_stable_diffusion_architecture/relation_analysis.py --models A B C --n 200 --out runs/relations
    COURSE_FAST=1 python 06_stable_diffusion_architecture/relation_analysis.py --models DIR --out /tmp/rel

Every held-out two-object scene is prompted in both of the grammar's wordings, "a A <rel> a B" and
"a B <inverse> a A" (the same picture is right for both), and each image is read by the judge. Of the images
whose two objects are right, the script counts the relation right, *swapped* (the inverse relation holds: the
objects in each other's place) or *other* (e.g. side by side for "above"), per wording and per axis.

It also measures what the text encoder can know. Under CLIP's causal mask the hidden state of a word depends
only on the words before it, so in "a large blue square to the left of ..." the first object's words are the
same vectors whatever relation and second object follow: printed as the largest difference between the first
object's hidden states for "left of" and "right of" (exactly 0 for a causal encoder). With an echoed prompt
(``ShapesTokenizer(echo=True)``) the second copy of those words has seen the relation: its difference is
printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from evaluate import generate

from common import cli
from common.judge import JUDGE_DIR, Judge, relation_holds
from common.runtime import budget, describe, get_device, seed_everything
from common.shapes import INVERSE, Shapes, caption

ROOT = Path(__file__).resolve().parents[1]
WORDINGS = ("A rel B", "B inverse A")  # the two pair templates of common/shapes.py, in order
AXIS = {"left of": "horizontal", "right of": "horizontal", "above": "vertical", "below": "vertical"}


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", required=True, help="diffusers-format course pipeline folders")
    p.add_argument("--n", type=cli.positive_int, default=None, help="scenes (default 200; fast 4)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=cli.positive_int, default=25)
    p.add_argument("--guidance", type=cli.nonnegative_float, default=3.0)
    p.add_argument(
        "--phrase",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="which phrasing of each relation: 0 'to the left of' / 'above', 1 'left of' / 'over', "
        "2 'on the left of' / 'on top of' (common/shapes.py RELATION_PHRASES)",
    )
    p.add_argument("--judge", default=None, help="the judge's folder (default: checkpoints/shapes_judge)")
    p.add_argument("--out", default=str(ROOT / "runs" / "relations"))
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    return p.parse_args(argv)


def classify(record: dict, scene) -> str:
    """'wrong objects', 'right', 'swapped' or 'other' for one judged two-object image."""
    if not record["pair_objects"]:
        return "wrong objects"
    if record["all"]:
        return "right"
    dets = record["detections"]

    def same(d, o) -> bool:
        return (d["shape"], d["color"], d["size"]) == (o.shape, o.color, o.size)

    for a, b in ((0, 1), (1, 0)):  # the judge's detection order is not the prompt's
        if (
            same(dets[a], scene.objects[0])
            and same(dets[b], scene.objects[1])
            and relation_holds(INVERSE[scene.relation], dets[a]["center"], dets[b]["center"])
        ):
            return "swapped"
    return "other"


@torch.no_grad()
def first_object_blindness(pipe) -> dict[str, float]:
    """Largest |h_left - h_right| over the first object's words, in the first copy and
    (if echoed) the second."""
    left = "a large blue square to the left of a small green triangle"
    right = left.replace("left", "right")
    ids = pipe.tokenizer([left, right]).to(pipe.device)
    h = pipe.text_encoder(ids).last_hidden_state.float()  # (2, N_k, D)
    first = slice(1, 5)  # "a large blue square" after <bos>
    out = {"first copy": float((h[0, first] - h[1, first]).abs().max())}
    if getattr(pipe.tokenizer, "echo", False):
        n = int((ids[0] != pipe.tokenizer.pad_id).sum()) // 2 + 1  # <bos> + 12 words + <eos>: 14
        second = slice(n, n + 4)
        out["second copy"] = float((h[0, second] - h[1, second]).abs().max())
    return out


def analyse(model: str, judge: Judge, scenes: list, args, device) -> dict:
    from common.pipeline import StableDiffusion

    pipe = StableDiffusion.from_pretrained(model, device=device)
    result = {
        "model": model,
        "echo": bool(getattr(pipe.tokenizer, "echo", False)),
        "blindness": first_object_blindness(pipe),
        "wordings": {},
    }
    for w, wording in enumerate(WORDINGS):
        prompts = [caption(s, w + len(WORDINGS) * args.phrase) for s in scenes]  # template w, phrase variant
        images = generate(pipe, prompts, args.sampler, args.steps, args.guidance, args.seed, 100)
        records = judge.score(images, prompts)["records"]
        kinds = [classify(r, s) for r, s in zip(records, scenes)]
        table = {}
        for axis in ("horizontal", "vertical", "all"):
            ks = [k for k, s in zip(kinds, scenes) if axis == "all" or AXIS[s.relation] == axis]
            right_objects = [k for k in ks if k != "wrong objects"]
            table[axis] = {
                "n": len(ks),
                "objects right": len(right_objects),
                **{k: sum(x == k for x in right_objects) for k in ("right", "swapped", "other")},
                "relation error": (sum(x != "right" for x in right_objects) / len(right_objects))
                if right_objects
                else float("nan"),
            }
        result["wordings"][wording] = table
    both = [t["all"] for t in result["wordings"].values()]
    n_right = sum(t["objects right"] for t in both)
    result["relation error"] = (
        sum(t["swapped"] + t["other"] for t in both) / n_right if n_right else float("nan")
    )
    result["all right"] = sum(t["right"] for t in both) / sum(t["n"] for t in both)
    return result


def markdown(results: list[dict], settings: str) -> str:
    lines = [
        f"Relation errors ({settings}). Of the images whose two objects are right: relation right, swapped "
        "(the inverse relation holds), other.",
        "",
        "| model | echo | wording | axis | n | objects right | right | swapped | other | relation error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for wording, table in r["wordings"].items():
            for axis, t in table.items():
                lines.append(
                    f"| `{r['model']}` | {'yes' if r['echo'] else 'no'} | {wording} | {axis} | {t['n']} | "
                    f"{t['objects right']} | {t['right']} | {t['swapped']} | {t['other']} | "
                    f"{t['relation error']:.2f} |"
                )
    lines += [
        "",
        "| model | all right (both wordings) | relation error | first object's words: largest difference "
        "between 'left of' and 'right of' |",
        "|---|---|---|---|",
    ]
    for r in results:
        blind = ", ".join(f"{k} {v:.3g}" for k, v in r["blindness"].items())
        lines.append(f"| `{r['model']}` | {r['all right']:.3f} | {r['relation error']:.3f} | {blind} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    for m in args.models:
        if not (Path(m) / "model_index.json").is_file():
            raise cli.UsageError(f"--models {m}: no course pipeline there (no model_index.json)")
    out = cli.writable_dir(args.out, "--out")
    device = get_device(args.device)
    seed_everything(args.seed)
    print(describe(device))
    n = args.n if args.n is not None else budget(fast=4, cpu=200)
    scenes = Shapes.scenes("test", n, 4321, (2,))
    judge = Judge.load(args.judge or JUDGE_DIR)
    results = [analyse(m, judge, scenes, args, device) for m in args.models]
    settings = (
        f"{n} held-out scenes x 2 wordings, phrase variant {args.phrase}, {args.sampler} {args.steps} steps, "
        f"guidance {args.guidance}, seed {args.seed}"
    )
    md = markdown(results, settings)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    cli.atomic_write(
        out / "relations.json",
        json.dumps({"settings": settings, "command": command, "results": results}, indent=1) + "\n",
    )
    cli.atomic_write(out / "relations.md", md + f"\nMeasured with `{command}`.\n")
    print(md)
    return results


if __name__ == "__main__":
    sys.exit(cli.run(main))
