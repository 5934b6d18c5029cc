"""Training prompts for ``benchmarks/train_eagle.py``: a mixture of sources, so the EAGLE head
learns the target's behaviour on varied chats rather than on a few templates.

Sources (each item is ``{"source": name, "messages": [chat messages]}``):

* ``generated``: user prompts the target itself writes in a first generation pass, from
  writer instructions ("Write one question a curious person might ask about {topic}.") over a
  large programmatic topic pool, sampled at temperature 1.0; cleaned by :func:`clean_generated`
  (preambles and quotes stripped, 10-300 characters, deduplicated);
* ``local_text``: real text from local files: paragraphs of .md/.rst/.txt documents, docstrings
  and functions of the Python stdlib / site-packages / this repository (not ``benchmarks/``),
  wrapped in "Summarize this:", "Explain this code:", "Continue this text:" ... (<= 1500 chars);
* ``template``: the original templates × topics of the trainer (kept as a minority);
* ``chat``: two-turn chats: user / the target's own answer (also from the first pass) / a
  follow-up request;
* a few items of every source carry a system prompt.

Nothing near a held-out prompt of ``benchmarks/eagle_eval_prompts.json`` is kept:
:func:`leaks` drops exact / contained copies, any shared 6-word run and word-set Jaccard >= 0.5.
"""
from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
import textwrap

# --- topics: domains × subjects, with angles -------------------------------------------------------
DOMAINS: dict[str, list[str]] = {
    "science": ["photosynthesis", "black holes", "the water cycle", "volcanoes", "the immune system",
                "plate tectonics", "DNA replication", "electric circuits", "gravity", "tides", "magnetism",
                "the periodic table", "evolution", "cell division", "nuclear fusion", "sound waves",
                "the speed of light", "chemical bonds", "ecosystems", "fossils", "the ozone layer", "enzymes",
                "friction", "static electricity", "the nitrogen cycle", "comets", "exoplanets", "neurons"],
    "technology": ["machine learning", "blockchain", "quantum computing", "the Internet", "solar panels",
                   "wind turbines", "3D printing", "smartphones", "cloud storage", "encryption", "GPS",
                   "self-driving cars", "robotics", "databases", "operating systems", "computer viruses",
                   "open-source software", "virtual reality", "fiber optics", "batteries", "drones",
                   "search engines", "password managers", "Wi-Fi", "microchips", "spreadsheets"],
    "programming": ["recursion", "unit testing", "version control with git", "regular expressions",
                    "object-oriented design", "REST APIs", "memory leaks", "sorting algorithms",
                    "linked lists", "binary trees", "concurrency", "exception handling", "code reviews",
                    "refactoring", "type systems", "dynamic programming", "caching", "logging",
                    "command-line tools", "web scraping", "JSON parsing", "dependency management",
                    "continuous integration", "big-O notation", "graph search", "string formatting"],
    "history": ["the French Revolution", "the Roman Empire", "the printing press", "the Silk Road",
                "the Renaissance", "ancient Egypt", "the Industrial Revolution", "the Vikings",
                "the Cold War", "the Ottoman Empire", "the Aztecs", "medieval castles", "the Ming dynasty",
                "the invention of the telephone", "the Apollo program", "the Black Death", "ancient Greece",
                "the abolition of slavery", "the first railways", "the Meiji era"],
    "health": ["nutrition", "meditation", "vaccines", "antibiotics", "the human heart", "stretching",
               "hydration", "posture at a desk", "strength training", "seasonal allergies", "stress",
               "healthy breakfasts", "first aid", "eye strain", "vitamins", "yoga", "back pain",
               "walking every day", "sugar intake", "screen time"],
    "daily life": ["cooking pasta", "grocery shopping", "cleaning a kitchen", "moving to a new city",
                   "saving money", "planning a birthday party", "commuting by bike", "houseplants",
                   "decluttering a closet", "writing a shopping list", "doing laundry", "meal prep",
                   "making friends as an adult", "time management", "morning routines", "home repairs",
                   "buying a used car", "renting an apartment", "composting", "learning to swim"],
    "work": ["writing a resume", "asking for a raise", "remote collaboration", "public speaking",
             "giving feedback", "starting a small business", "negotiating a contract", "project deadlines",
             "writing a cover letter", "networking events", "managing a budget", "customer complaints",
             "onboarding new employees", "writing clear emails", "marketing on social media",
             "a career change", "freelancing", "leadership"],
    "arts": ["jazz music", "origami", "watercolor painting", "poetry", "photography", "street art",
             "classical music", "film editing", "sculpture", "calligraphy", "knitting", "pottery",
             "stand-up comedy", "opera", "graphic novels", "theater", "songwriting", "architecture"],
    "nature": ["coral reefs", "rainforests", "honeybees", "penguins", "bird migration", "glaciers",
               "mushrooms", "wolves", "deserts", "whales", "earthworms", "butterflies", "rivers",
               "mountain weather", "bamboo", "owls", "sharks", "wetlands", "elephants", "ants"],
    "society": ["democracy", "supply and demand", "compound interest", "the stock market", "recycling",
                "public libraries", "volunteering", "urban planning", "public transport", "taxes",
                "renewable energy", "climate change", "social media", "online privacy", "elections",
                "minimum wage", "tourism", "immigration", "free speech", "insurance"],
    "leisure": ["chess openings", "the Olympic Games", "coffee", "tea ceremonies", "bicycles",
                "board games", "camping", "fishing", "video games", "gardening", "baking bread",
                "travel on a budget", "learning a new language", "birdwatching", "rock climbing",
                "football tactics", "card tricks", "puzzles", "karaoke", "sailing"],
}
ANGLES = ["{t}", "{t}", "{t}", "the history of {t}", "{t} for beginners", "common mistakes with {t}",
          "the future of {t}", "{t} on a budget", "the science behind {t}", "myths about {t}",
          "{t} for kids", "ethical questions around {t}", "{t} in everyday life", "careers related to {t}"]
PERSONAS = ["a student", "a retired teacher", "a nurse", "a farmer", "a software engineer", "a parent",
            "a small business owner", "a curious child", "a journalist", "a chef", "a data scientist",
            "a tourist", "a musician", "a scientist", "a high-school teacher", "a beginner programmer",
            "a gardener", "a lawyer", "an athlete", "a librarian"]
LANGS = ["Python", "C", "Java", "Go", "C++", "TypeScript", "Ruby", "Haskell", "Kotlin", "Lua", "Swift",
         "PHP", "R", "Scala", "C#", "Perl"]


def all_topics() -> list[str]:
    return [t for ts in DOMAINS.values() for t in ts]


def random_topic(rng: random.Random) -> tuple[str, str]:
    """(domain, topic with an angle)."""
    domain = rng.choice(sorted(DOMAINS))
    return domain, rng.choice(ANGLES).format(t=rng.choice(DOMAINS[domain]))


# --- first pass: the target writes user prompts ------------------------------------------------------
# (kind, instruction); a kind's examples are shown as two earlier chat turns (few-shot), which
# keeps the small target's replies to "one user message, nothing else" far more often
WRITERS = [
    ("question", "Write one question a curious person might ask about {topic}."),
    ("request", "Write a short request a user could send to an AI assistant about {topic}."),
    ("code", "Give me a task for a programmer about {topic}."),
    ("question", "Write a question that {persona} might ask an AI assistant about {topic}."),
    ("question", "Write a practical question about {topic} that someone could ask a friend."),
    ("request", "Write an instruction asking an assistant to create something (a list, a plan, a story or a poem) about {topic}."),
    ("question", "Write one homework question about {topic}."),
    ("advice", "Write a request for advice about {topic}, as {persona} would write it."),
    ("creative", "Write a creative writing prompt about {topic}."),
    ("math", "Write a short word problem involving numbers and {topic}."),
    ("question", "Write one interview question about {topic}."),
    ("question", "Write a question comparing two things related to {topic}."),
    ("code", "Give me a coding exercise in {lang} related to {topic}."),
    ("advice", "Write a 'how do I' question about {topic}."),
    ("question", "Write a question someone might post on a forum about {topic}."),
]
WRITER_EXAMPLES = {
    "question": [("tides", "Why are there two high tides on most days?"),
                 ("honeybees", "How do honeybees decide where to build a new hive?"),
                 ("the Roman Empire", "What were the main reasons the Western Roman Empire collapsed?"),
                 ("encryption", "How can two computers agree on a secret key over a public network?")],
    "request": [("jazz music", "Make me a list of ten classic jazz albums for a beginner, with one sentence on each."),
                ("public transport", "Write a short speech for a town meeting in favour of more bus lines."),
                ("gardening", "Create a one-month plan for starting a herb garden on a balcony.")],
    "code": [("sorting algorithms", "Write a Python function that sorts a list of dates given as strings in the format DD/MM/YYYY."),
             ("caching", "Implement a least-recently-used cache class in Java with get and put methods."),
             ("JSON parsing", "Write a Go program that reads a JSON file of users and prints the names of those older than 30.")],
    "advice": [("saving money", "I spend too much on takeaway food every week. How can I cut down without getting bored?"),
               ("public speaking", "How do I stop my voice from shaking when I present in front of my class?"),
               ("houseplants", "My fern keeps turning brown at the tips. What am I doing wrong?")],
    "creative": [("lighthouses", "Write a short story about the last lighthouse keeper on a stormy island."),
                 ("chess openings", "Write a poem in which two chess pieces argue about who is more important.")],
    "math": [("baking bread", "A recipe needs 450 grams of flour for one loaf. How much flour is needed for 7 loaves?"),
             ("bicycles", "Ana cycles 18 kilometres per hour. How long does a 63-kilometre ride take her?")],
}
WRITER_SYSTEM = "You write one realistic user message. Reply with the message only, no introduction."


def writer_requests(n: int, rng: random.Random) -> list[list[dict]]:
    """``n`` first-pass chats: two examples of the kind (as earlier turns), then the request."""
    out = []
    for _ in range(n):
        _, topic = random_topic(rng)
        kind, instr = rng.choice(WRITERS)
        msgs = [{"role": "system", "content": WRITER_SYSTEM}] if rng.random() < 0.5 else []
        for t, ex in rng.sample(WRITER_EXAMPLES[kind], 2):
            msgs += [{"role": "user", "content": instr.format(topic=t, persona=rng.choice(PERSONAS), lang="Python")},
                     {"role": "assistant", "content": ex}]
        msgs.append({"role": "user", "content": instr.format(topic=topic, persona=rng.choice(PERSONAS),
                                                             lang=rng.choice(LANGS))})
        out.append(msgs)
    return out


_PREAMBLE = re.compile(r"^(sure|certainly|of course|here('s| is| are)|okay|ok|absolutely|great)\b[^:\n]*[:!.]\s*",
                       re.IGNORECASE)
_LABEL = re.compile(r"^(\*\*)?(question|request|task|prompt|user|message|exercise|problem|"
                    r"homework question|interview question|word problem|writing prompt)( \d+)?(\*\*)?\s*[:.-]\s*(\*\*)?\s*",
                    re.IGNORECASE)


def clean_generated(text: str) -> str | None:
    """The user prompt in one generated reply, or None: drops preambles ("Sure! Here's a
    question:"), labels ("Question:"), list markers and quotes; 10-300 characters; keeps a
    second line only for code or multi-part requests (first non-empty line otherwise)."""
    text = text.strip()
    text = _PREAMBLE.sub("", text).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    line = lines[0]
    if line.endswith(":") and len(lines) > 1:  # "Here is a question:" then the question
        line = lines[1]
    line = _LABEL.sub("", line).strip()
    line = re.sub(r"^(\d+[.)]|[-*•])\s+", "", line).strip()
    line = line.strip('"“”\'*` ').strip()
    if not (10 <= len(line) <= 300) or not re.search(r"[A-Za-z]{3}", line):
        return None
    if line[-1] not in ".?!)\"'`" and len(line) < 40:  # probably cut off
        return None
    if line.lower().startswith(("i'm sorry", "i am sorry", "as an ai", "i cannot", "i can't")):
        return None
    return line


# --- real text from local files -----------------------------------------------------------------------
PROSE_TASKS = ["Summarize this:\n\n{x}", "Summarize the following text in three bullet points.\n\n{x}",
               "Continue this text:\n\n{x}", "What does this paragraph say about {kw}?\n\n{x}",
               "Explain this text in simpler words:\n\n{x}", "{x}\n\nWhat is the main point of the text above?",
               "Write two questions a reader might have after reading this:\n\n{x}",
               "Rewrite this paragraph to be more concise:\n\n{x}", "Give this text a short title.\n\n{x}",
               "{x}\n\nExplain the term '{kw}' as used here."]
CODE_TASKS = ["Explain this code:\n\n```python\n{x}\n```", "Add comments to this function:\n\n```python\n{x}\n```",
              "What does this Python function do?\n\n```python\n{x}\n```",
              "Write a unit test for this function:\n\n```python\n{x}\n```",
              "Are there any bugs or edge cases in this code?\n\n```python\n{x}\n```",
              "Rewrite this function to be more readable.\n\n```python\n{x}\n```",
              "```python\n{x}\n```\n\nWrite a docstring for this function.",
              "Translate this Python code to {lang}:\n\n```python\n{x}\n```"]
DOC_TASKS = ["Summarize this documentation:\n\n{x}", "Explain this docstring to a beginner:\n\n{x}",
             "Write a short usage example based on this documentation:\n\n{x}",
             "What does this describe? Answer in one paragraph.\n\n{x}"]
_SKIP_NAMES = ("license", "copying", "authors", "notice", "changelog", "changes", "history", "record",
               "metadata", "entry_points", "top_level", "requirements", "third_party", "patents")


def _text_files(roots: list[str], exts: tuple[str, ...], skip_dirs: tuple[str, ...]) -> list[str]:
    out = []
    for root in roots:
        if not root or not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", ".git", ".venv", "node_modules")
                                 and not any(os.path.join(dirpath, d).startswith(s) for s in skip_dirs))
            for name in sorted(filenames):
                low = name.lower()
                if low.endswith(exts) and not any(k in low for k in _SKIP_NAMES):
                    out.append(os.path.join(dirpath, name))
    return out


def _proseish(x: str) -> bool:
    letters = sum(c.isalpha() or c == " " for c in x)
    return letters > 0.75 * len(x) and len(x.split()) >= 25 and "copyright" not in x.lower() \
        and "warranty" not in x.lower()


def _keyword(x: str, rng: random.Random) -> str:
    words = [w.strip(".,;:()'\"`") for w in x.split()]
    words = [w for w in words if len(w) >= 6 and w.isalpha()]
    return rng.choice(words).lower() if words else "its subject"


def _chunks_from_prose(path: str, max_chars: int) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(400_000)
    except (OSError, UnicodeDecodeError):
        return []
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    out, cur = [], ""
    for p in paras:
        if not _proseish(p) and not (cur and len(p) > 40 and _proseish(cur + " " + p)):
            if len(cur) >= 200:
                out.append(cur)
            cur = ""
            continue
        cur = (cur + "\n\n" + p).strip() if len(cur) + len(p) < max_chars else cur
        if len(cur) >= 600:
            out.append(cur[:max_chars])
            cur = ""
    if len(cur) >= 200:
        out.append(cur[:max_chars])
    return out


def _chunks_from_python(path: str, max_chars: int) -> tuple[list[str], list[str]]:
    """(functions' source, docstrings) of one file."""
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read(300_000)
        tree = ast.parse(src)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return [], []
    code, docs = [], []
    lines = src.splitlines(keepends=True)
    doc = ast.get_docstring(tree)
    if doc and 200 <= len(doc) <= max_chars:
        docs.append(doc)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            d = ast.get_docstring(node)
            if d and 200 <= len(d) <= max_chars:
                docs.append(d)
            if isinstance(node, ast.ClassDef) or node.end_lineno is None:
                continue
            first = min([node.lineno] + [x.lineno for x in node.decorator_list])
            if not 5 <= node.end_lineno - first + 1 <= 60:
                continue
            seg = textwrap.dedent("".join(lines[first - 1:node.end_lineno])).strip("\n")
            if 150 <= len(seg) <= max_chars:
                code.append(seg)
    return code, docs


def local_text_prompts(n: int, rng: random.Random, max_chars: int = 1500, max_files: int = 600,
                       repo_root: str | None = None) -> list[str]:
    """``n`` prompts (or fewer if the files run out) wrapping real local text: about 40 % code,
    30 % docstrings, 30 % prose of .md/.rst/.txt documents. Reads ``max_files`` files at most."""
    if n <= 0:
        return []
    paths = sysconfig.get_paths()
    roots = [paths.get("stdlib"), paths.get("purelib"), repo_root]
    skip = tuple(s for s in ([os.path.join(repo_root, "benchmarks")] if repo_root else []) +
                 [os.path.join(paths.get("stdlib") or "/nonexistent", "test")])
    roots = list(dict.fromkeys(r for r in roots if r))
    py = _text_files(roots, (".py",), skip)
    prose = _text_files(roots, (".md", ".rst", ".txt"), skip)
    rng.shuffle(py)
    rng.shuffle(prose)
    code_pool, doc_pool, prose_pool = [], [], []
    for p in prose[:max_files]:  # cheap: most are not prose
        c = _chunks_from_prose(p, max_chars)
        prose_pool.extend(rng.sample(c, min(len(c), 3)))
        if len(prose_pool) > 2 * n:
            break
    for p in py[:max_files]:
        c, d = _chunks_from_python(p, max_chars)
        # a few items per file, so one big module does not dominate
        code_pool.extend(rng.sample(c, min(len(c), 4)))
        doc_pool.extend(rng.sample(d, min(len(d), 3)))
        if len(code_pool) > 2 * n and len(doc_pool) > 2 * n:
            break
    for pool in (code_pool, doc_pool, prose_pool):
        rng.shuffle(pool)
    want = {"code": round(0.4 * n), "doc": round(0.3 * n)}
    want["prose"] = n - want["code"] - want["doc"]
    # a short pool gives its share to the others
    pools = {"code": code_pool, "doc": doc_pool, "prose": prose_pool}
    spare = sum(max(0, want[k] - len(pools[k])) for k in pools)
    take = {k: min(want[k], len(pools[k])) for k in pools}
    for k in pools:
        extra = min(spare, len(pools[k]) - take[k])
        take[k] += extra
        spare -= extra
    out = []
    for x in code_pool[:take["code"]]:
        out.append(rng.choice(CODE_TASKS).format(x=x.strip(), lang=rng.choice(LANGS)))
    for x in doc_pool[:take["doc"]]:
        out.append(rng.choice(DOC_TASKS + PROSE_TASKS[:3]).format(x=x.strip(), kw=_keyword(x, rng)))
    for x in prose_pool[:take["prose"]]:
        out.append(rng.choice(PROSE_TASKS).format(x=x.strip(), kw=_keyword(x, rng)))
    rng.shuffle(out)
    return out


# --- the original templates -----------------------------------------------------------------------------
CODE_JOBS = ["reverses a linked list", "computes the nth Fibonacci number", "merges two sorted lists",
             "counts word frequencies in a text", "finds the largest element of an array",
             "checks whether a number is prime", "implements binary search", "flattens a nested list",
             "removes duplicates from a list", "converts Celsius to Fahrenheit",
             "computes the greatest common divisor of two integers", "sorts an array with quicksort",
             "parses a CSV line into fields", "validates an email address with a simple rule",
             "rotates a matrix by 90 degrees", "computes a moving average", "finds anagrams in a word list",
             "converts a Roman numeral to an integer", "implements a stack with two queues",
             "computes the edit distance of two strings", "groups records by a key"]
SENTENCES = ["The meeting was postponed because of the storm.", "She quickly finished her homework.",
             "Our team won the regional championship last night.", "The old bridge needs urgent repairs.",
             "He forgot his umbrella at the station.", "The museum opens a new exhibition in May.",
             "They planted tomatoes and basil in the garden.", "The price of fuel rose again this month.",
             "The library will extend its opening hours next year.", "My brother fixed the broken fence."]
TARGET_LANGS = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch"]
TEMPLATES = [
    "Explain {topic} in simple terms.", "What is {topic}?", "Why is {topic} important?",
    "Give me a short overview of {topic}.", "List five interesting facts about {topic}.",
    "How would you teach {topic} to {person}?", "Write a short story about {person} who discovers {topic}.",
    "Write a poem about {topic}.", "Write an email to a colleague inviting them to a talk about {topic}.",
    "What are common misconceptions about {topic}?", "Summarize the history of {topic} in a paragraph.",
    "Ask me three quiz questions about {topic} and give the answers.",
    "How does {topic} affect everyday life?", "Write a blog post introduction about {topic}.",
    "Describe {topic} from the point of view of {person}.", "Give step-by-step instructions to learn about {topic}.",
    "Compare {topic} and {topic2}.", "What would happen if {topic} disappeared?",
    "Write a product description for a book about {topic}.", "Tell me a joke about {topic}.",
]


def _math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 90), rng.randint(2, 40), rng.randint(2, 12)
    item = rng.choice(["apples", "books", "marbles", "stickers", "pencils", "cookies", "tickets"])
    who = rng.choice(["Tom", "Maria", "Aisha", "Ken", "Lena", "Omar", "Sofia", "Jack"])
    forms = [f"{who} has {a} {item} and buys {b} more. Then {who} gives away {c}. How many {item} are left?",
             f"A box holds {c} {item}. How many boxes are needed for {a * c + b} {item}?",
             f"{who} reads {b} pages a day. How many days to finish a book of {a * b} pages?",
             f"What is {a} times {b} plus {c}? Show your work.",
             f"A shirt costs {a} dollars and is discounted by {c * 5} percent. What is the new price?"]
    return rng.choice(forms)


def template_prompt(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:
        return f"Write a {rng.choice(LANGS)} function that {rng.choice(CODE_JOBS)}."
    if kind < 0.25:
        return _math_prompt(rng)
    if kind < 0.32:
        s = rng.choice(SENTENCES)
        return rng.choice([f"Translate into {rng.choice(TARGET_LANGS)}: {s}", f"Rewrite this sentence more formally: {s}",
                           f"Rewrite this sentence for a child: {s}", f"Fix the grammar and style: {s.lower()}"])
    t1, t2 = rng.sample(all_topics(), 2)
    return rng.choice(TEMPLATES).format(topic=t1, topic2=t2, person=rng.choice(PERSONAS))


# --- two-turn chats ----------------------------------------------------------------------------------------
FOLLOWUPS = ["Can you make that shorter?", "Can you give me a concrete example?", "Why is that?",
             "Can you explain the second point in more detail?", "Thanks! Can you summarize that in one sentence?",
             "Now write it as a bulleted list.", "What would you recommend for a complete beginner?",
             "Can you rewrite that in a more formal tone?", "Is there anything important you left out?",
             "How would I explain this to a child?", "Translate your answer into French.",
             "Give me three follow-up questions I could ask.", "What are the main risks or downsides?",
             "Can you turn that into a short quiz?", "That's helpful. What should I do first?"]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Keep answers short.",
           "You are a friendly tutor who explains things step by step.",
           "You are an expert programmer. Answer with code when useful.",
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face"]


def chat_items(firsts: list[str], answers: list[str], rng: random.Random) -> list[list[dict]]:
    out = []
    for q, a in zip(firsts, answers):
        a = a.strip()
        if len(a) < 20:
            continue
        out.append([{"role": "user", "content": q}, {"role": "assistant", "content": a},
                    {"role": "user", "content": rng.choice(FOLLOWUPS)}])
    return out


# --- held-out leakage -----------------------------------------------------------------------------------------
def _words(x: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", x.lower())


class LeakFilter:
    """Whether a training text is (near) one of the held-out prompts: contains / is contained
    in one, shares a run of ``ngram`` words with one, or word-set Jaccard >= ``jaccard``."""

    def __init__(self, held_out: list[str], ngram: int = 6, jaccard: float = 0.5):
        self.held = [" ".join(_words(p)) for p in held_out]
        self.sets = [set(_words(p)) for p in held_out]
        self.ngram, self.jaccard = ngram, jaccard
        self.grams = {tuple(w[i:i + ngram]) for w in map(_words, held_out) for i in range(len(w) - ngram + 1)}

    def __call__(self, text: str) -> bool:
        w = _words(text)
        joined = " ".join(w)
        if any(h in joined or (joined and joined in h) for h in self.held):
            return True
        if any(tuple(w[i:i + self.ngram]) in self.grams for i in range(len(w) - self.ngram + 1)):
            return True
        s = set(w)
        return any(len(s & h) / max(1, len(s | h)) >= self.jaccard for h in self.sets)


def user_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")
