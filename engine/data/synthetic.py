"""generate-corpus: a deterministic corpus of short children's stories as JSONL shards.

The demo and the tests need real-looking text without the network or the shared test data; these
stories are built from templates with a seeded RNG, so every run yields the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field

from engine.atomic import staged_dir
from engine.manifest import Manifest, fingerprint, sha256_file, write_manifest
from engine.spec import StageSpec


NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Emma", "Jack"]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "frog", "bear", "duck", "mouse", "owl"]
PLACES = ["park", "garden", "forest", "beach", "farm", "river", "school", "town", "hill", "lake"]
THINGS = ["ball", "kite", "box", "hat", "book", "cake", "boat", "flower", "drum", "shell"]
ADJECTIVES = ["big", "small", "red", "blue", "happy", "shiny", "soft", "old", "funny", "kind"]
FEELINGS = ["happy", "sad", "scared", "excited", "proud", "tired", "surprised", "brave"]
VERBS = ["play", "run", "jump", "sing", "dance", "swim", "read", "paint", "build", "climb"]

OPENINGS = [
    "Once upon a time, there was a {adj} {animal} named {name}.",
    "One day, {name} went to the {place} with a {adj} {thing}.",
    "{name} was a little {animal} who lived near the {place}.",
    "There was a {adj} {thing} in the {place}, and {name} wanted to see it.",
]
MIDDLES = [
    "{name} liked to {verb} every day.",
    "At the {place}, {name} met a {adj} {animal2}.",
    "The {animal2} said, \"Can I {verb} with you?\"",
    "{name} felt {feeling} because the {thing} was {adj}.",
    "They found a {adj} {thing} under a tree.",
    "{name} and the {animal2} decided to {verb} together.",
    "Suddenly, the {thing} fell into the {place2}.",
    "{name} looked for the {thing} for a long time.",
    "The sun was warm and the sky was {color}.",
    "\"Let's {verb}!\" said {name} with a big smile.",
]
ENDINGS = [
    "In the end, {name} was very {feeling} and went home.",
    "From that day on, {name} and the {animal2} were best friends.",
    "{name} learned that it is good to share.",
    "They had a lot of fun, and {name} could not wait to {verb} again.",
]
COLORS = ["blue", "pink", "grey", "gold", "bright"]


def story(rng: random.Random) -> str:
    words = dict(name=rng.choice(NAMES), animal=rng.choice(ANIMALS), animal2=rng.choice(ANIMALS),
                 place=rng.choice(PLACES), place2=rng.choice(PLACES), thing=rng.choice(THINGS),
                 adj=rng.choice(ADJECTIVES), verb=rng.choice(VERBS), feeling=rng.choice(FEELINGS),
                 color=rng.choice(COLORS))
    body = [rng.choice(OPENINGS)] + rng.sample(MIDDLES, rng.randint(2, 6)) + [rng.choice(ENDINGS)]
    return " ".join(s.format(**words) for s in body)


class Spec(StageSpec):
    """Generate a deterministic corpus of short children's stories as JSONL shards: real-looking
    text without the network, the same bytes on every run."""

    output: str = Field(description="output folder (JSONL shards + manifest)",
                        json_schema_extra={"affects_output": False})
    documents: int = Field(default=2000, ge=1, description="number of stories")
    shards: int = Field(default=2, ge=1, description="number of JSONL files")
    seed: int = Field(default=1234, description="RNG seed; same seed, same bytes")
    name: str = Field(default="stories", pattern=r"^[A-Za-z0-9_-]+$",
                      description="file name prefix: NAME-000.jsonl, NAME-001.jsonl, ...")


def input_paths(spec: Spec) -> dict[str, str]:
    return {}  # generated from the seed alone


def run(spec: Spec) -> Manifest:
    rng = random.Random(spec.seed)
    per_shard = -(-spec.documents // spec.shards)
    with staged_dir(spec.output) as tmp:
        for s in range(spec.shards):
            n = min(per_shard, spec.documents - s * per_shard)
            with open(tmp / f"{spec.name}-{s:03d}.jsonl", "w", encoding="utf-8") as f:
                for i in range(max(n, 0)):
                    f.write(json.dumps({"id": s * per_shard + i, "text": story(rng)}) + "\n")
        files = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.jsonl"))}
        manifest = Manifest(kind="corpus", stage="generate-corpus",
                            spec=spec.model_dump(mode="json"),
                            fingerprint=fingerprint("generate-corpus", spec.fingerprint_fields(), {}),
                            summary={"documents": spec.documents, "shards": spec.shards,
                                     "bytes": sum(f.bytes for f in files.values())},
                            files=files)
        write_manifest(tmp, manifest)
    return manifest


def shards(corpus_dir: str | Path) -> list[Path]:
    return sorted(Path(corpus_dir).glob("*.jsonl"))
