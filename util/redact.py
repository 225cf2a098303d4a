"""Secrets out of what a run writes down. A private shard set is read with a token: in a URL (`user:password@host`,
a signed URL's query), in a `pipe:curl ... -H 'Authorization: Bearer TOKEN'` command, or as a Hugging Face token.
Every place that prints, logs or saves arguments (stdout, log.txt, checkpoints, record.sh's log) writes them
through redact(); the run itself keeps the real values. Better still, keep tokens off the command line: HTTP(S)
reads of huggingface.co send $HF_TOKEN (util/shards.py)."""
import re

HIDDEN = '<redacted>'
PATTERNS = [
    (re.compile(r'(://)[^/@\s\'"]+@'), rf'\1{HIDDEN}@'),  # user:password@host
    (re.compile(r'([?&][^=&#\s\'"]+=)[^&#\s\'"]+'), rf'\1{HIDDEN}'),  # every query value: signatures, tokens
    (re.compile(r'((?:authorization|private-token|x-api-key|cookie)\s*:\s*(?:bearer\s+|basic\s+|token\s+)?)'
                r'[^\s\'"]+', re.IGNORECASE), rf'\1{HIDDEN}'),  # header values in a pipe: command
    (re.compile(r'\bhf_[A-Za-z0-9]{16,}'), HIDDEN),  # a Hugging Face token anywhere
]


def redact(text):
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redacted_args(args):
    """A dict of arguments (vars(args)) with every string redacted."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in args.items()}
