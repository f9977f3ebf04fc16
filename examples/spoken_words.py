"""Few-shot spoken words on the Free Spoken Digit Dataset with a PaddleSpeech model: MAML, FOMAML, ANIL or a baseline.

    python examples/spoken_words.py --data-root ../shared/data/fsdd --out runs/fsdd-maml-1shot \\
        --algorithm maml --model mdtc --ways 5 --shots 1 --iterations 300

A class is a (digit, speaker) pair: 10 digits x 6 speakers, 50 recordings each. Meta-training uses the classes of 4
speakers, meta-testing the 20 classes of the 2 held-out speakers (--test-speakers), so a test episode asks for new
words of new voices. Each recording (8 kHz) is cut or zero-padded to --seconds and turned into log-mel filter banks
with PaddleSpeech's own Kaldi-compatible `fbank`, computed once and cached (--cache-dir). The model is PaddleSpeech's
MDTC keyword-spotting backbone (which returns `(out, None)`, hence a small wrapper that also averages over time) or
its ECAPA-TDNN speaker encoder (which returns `[B, C, 1]`), each with a linear head.

--algorithm baseline pre-trains the same backbone with a head over all meta-training classes, then fine-tunes a fresh
head on each test support set (the same test episodes). Writes OUT/metrics.jsonl, OUT/learning_curve.png,
OUT/checkpoint.pkl (plain model keys; --resume continues from it) and OUT/results.json.
"""
import hashlib
import io
import os
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import paddle
from paddle import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline  # noqa: E402
import episodic  # noqa: E402

from paddlefsl.datasets import CorruptDatasetError, DatasetNotFoundError  # noqa: E402

try:
    import soundfile
    from paddlespeech.audio.compliance.kaldi import fbank
    from paddlespeech.kws.models.mdtc import MDTC
    from paddlespeech.vector.models.ecapa_tdnn import EcapaTdnn
except ImportError as err:  # pragma: no cover - depends on the environment
    sys.exit(f"examples/spoken_words.py needs PaddleSpeech: pip install -e '.[speech]' && "
             f"pip install --no-deps paddlespeech==1.5.0 ({err})")

SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
RATE = 8000


class MDTCFeatures(nn.Layer):
    """MDTC takes ``[B, T, mels]`` and returns ``(out [B, T, C], None)``: keep ``out`` and average it over time."""

    def __init__(self, mels: int, channels: int, stacks: int = 1, stack_size: int = 4, kernel: int = 5) -> None:
        super().__init__()
        self.mdtc = MDTC(stack_num=stacks, stack_size=stack_size, in_channels=mels, res_channels=channels,
                         kernel_size=kernel, causal=False)
        self.dim = channels

    def forward(self, x):
        out, _ = self.mdtc(x.transpose([0, 2, 1]))
        return out.mean(axis=1)


class EcapaFeatures(nn.Layer):
    """ECAPA-TDNN takes ``[B, mels, T]`` and returns ``[B, C, 1]``: squeeze the last axis."""

    def __init__(self, mels: int, channels: int) -> None:
        super().__init__()
        self.ecapa = EcapaTdnn(mels, lin_neurons=channels, channels=[channels] * 4 + [3 * channels],
                               attention_channels=channels // 2, res2net_scale=4, se_channels=channels // 2)
        self.dim = channels

    def forward(self, x):
        return self.ecapa(x).squeeze(-1)


class SpokenWordClassifier(nn.Layer):
    """``head(features(x))``: the ``features`` / ``head`` split ANIL needs."""

    def __init__(self, features: nn.Layer, head: nn.Layer) -> None:
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x):
        return self.head(self.features(x))


def log_mel(data: bytes, name: str, seconds: float, mels: int) -> np.ndarray:
    """Log-mel filter banks ``[mels, frames]`` of one WAV file's bytes, cut or padded to ``seconds``.

    Raises:
        CorruptDatasetError: naming the file, if it cannot be decoded, is empty, or is not 8 kHz mono.
    """
    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    except (RuntimeError, ValueError, TypeError, soundfile.LibsndfileError) as err:
        raise CorruptDatasetError(f"{name}: not a readable WAV file ({err}); re-extract or re-download it") from err
    if rate != RATE or wave.ndim != 1:
        raise CorruptDatasetError(f"{name}: expected 8 kHz mono audio, got {rate} Hz with shape {wave.shape}")
    if wave.size < 400:  # shorter than one 25 ms analysis frames at 8 kHz (200 samples), twice over
        raise CorruptDatasetError(f"{name}: {wave.size} samples is too short to be a spoken digit (truncated?)")
    length = int(round(seconds * RATE))
    wave = np.pad(wave[:length], (0, max(0, length - wave.size)))
    feats = fbank(paddle.to_tensor(wave[None, :], dtype="float32"), n_mels=mels, sr=RATE)
    return feats.numpy().T.astype(np.float32)


def load_fsdd(root: str, seconds: float, mels: int, cache_dir: str) -> tuple:
    """Log-mel features ``[3000, mels, frames]`` and ``(digit, speaker)`` of each recording, cached in ``cache_dir``."""
    path = os.path.join(root, "recordings.zip")
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"FSDD archive not found: expected {os.path.abspath(path)}; download it from "
                                   "https://github.com/Jakobovski/free-spoken-digit-dataset (recordings.zip)")
    stat = os.stat(path)
    key = hashlib.sha1(f"{stat.st_size}-{int(stat.st_mtime)}-{seconds}-{mels}".encode()).hexdigest()[:12]
    cache = os.path.join(cache_dir, f"fsdd-logmel-{key}.npz")
    if os.path.exists(cache):
        with np.load(cache) as stored:
            return stored["features"], stored["digits"], stored["speakers"]
    features, digits, speakers = [], [], []
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise CorruptDatasetError(f"{path} is not a valid zip archive ({err})") from err
    with archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".wav"))
        if not names:
            raise CorruptDatasetError(f"{path} holds no .wav files")
        for name in names:
            stem = os.path.basename(name)[:-4].split("_")
            if len(stem) != 3 or not stem[0].isdigit() or stem[1] not in SPEAKERS:
                raise CorruptDatasetError(f"{name}: expected a name DIGIT_SPEAKER_INDEX.wav with a speaker of "
                                          f"{', '.join(SPEAKERS)}")
            try:
                data = archive.read(name)
            except (zipfile.BadZipFile, OSError) as err:
                raise CorruptDatasetError(f"{name} in {path}: cannot be read from the archive ({err})") from err
            features.append(log_mel(data, name, seconds, mels))
            digits.append(int(stem[0]))
            speakers.append(SPEAKERS.index(stem[1]))
    features, digits, speakers = np.stack(features), np.asarray(digits), np.asarray(speakers)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache + ".tmp.npz"
    np.savez(tmp, features=features, digits=digits, speakers=speakers)
    os.replace(tmp, cache)
    return features, digits, speakers


p = episodic.parser(__doc__.splitlines()[0], dict(query=5, iterations=300, meta_batch=4, inner_steps=1,
                                                  test_inner_steps=1, inner_lr=1.0),
                    algorithms=episodic.ALGORITHMS + ("baseline",))
p.add_argument("--model", choices=("mdtc", "ecapa"), default="mdtc")
p.add_argument("--channels", type=int, default=16, help="backbone width")
p.add_argument("--mels", type=int, default=40)
p.add_argument("--seconds", type=float, default=1.0, help="cut or zero-pad each recording to this length")
p.add_argument("--test-speakers", default="theo,yweweler",
               help="comma-separated held-out speakers for meta-testing (the others meta-train)")
p.add_argument("--cache-dir", default=None, help="where the features are cached (default DATA_ROOT/paddlefsl_cache)")
episodic.add_head_init_argument(p)
baseline.add_arguments(p)
args = p.parse_args()
episodic.check_args(p, args)
if args.algorithm == "baseline":
    baseline.check_arguments(p, args)
if args.augment_shift:
    p.error("--augment-shift shifts images; it is not meant for filter banks")
if args.split != "minimal":
    p.error("--split applies to Omniglot; FSDD is split by --test-speakers")
if args.channels < 4 or args.mels < 8 or not 0.2 <= args.seconds <= 3.0:
    p.error(f"need --channels >= 4, --mels >= 8 and --seconds in 0.2..3.0; got {args.channels}, {args.mels}, "
            f"{args.seconds}")
held_out = [s for s in args.test_speakers.split(",") if s]
unknown = sorted(set(held_out) - set(SPEAKERS))
if unknown or not held_out or len(held_out) == len(SPEAKERS):
    p.error(f"--test-speakers must name 1 to {len(SPEAKERS) - 1} of {', '.join(SPEAKERS)}; got {args.test_speakers}")
if args.ways > 10 * len(held_out):
    p.error(f"--ways {args.ways} exceeds the {10 * len(held_out)} test classes of {len(held_out)} speakers")

try:
    features, digits, speakers = load_fsdd(args.data_root, args.seconds, args.mels,
                                           args.cache_dir or os.path.join(args.data_root, "paddlefsl_cache"))
except (DatasetNotFoundError, CorruptDatasetError) as err:
    p.exit(2, f"{p.prog}: error: {err}\n")
labels = speakers * 10 + digits
is_test = np.isin(speakers, [SPEAKERS.index(s) for s in held_out])
counts = np.bincount(labels, minlength=10 * len(SPEAKERS))
for label in np.unique(labels):
    if counts[label] < args.shots + args.query:
        p.error(f"class digit {label % 10} of {SPEAKERS[label // 10]} has {counts[label]} recordings, fewer than "
                f"--shots + --query = {args.shots + args.query}")
mean, std = features[~is_test].mean(), features[~is_test].std()  # meta-training statistics only
features = ((features - mean) / std).astype(paddle.get_default_dtype())
print(f"FSDD: {int((~is_test).sum())} meta-training recordings ({len(np.unique(labels[~is_test]))} classes), "
      f"{int(is_test.sum())} meta-test ({len(np.unique(labels[is_test]))} classes of {', '.join(held_out)}); "
      f"features {features.shape[1:]}")
train = SimpleNamespace(images=features[~is_test], labels=labels[~is_test])
test = SimpleNamespace(images=features[is_test], labels=labels[is_test])

paddle.seed(args.seed)
backbone = MDTCFeatures(args.mels, args.channels) if args.model == "mdtc" else EcapaFeatures(args.mels, args.channels)
if args.algorithm == "baseline":
    baseline.run(args, backbone, backbone.dim, train, test)
else:
    episodic.run(args, SpokenWordClassifier(backbone, episodic.linear_head(backbone.dim, args.ways, args.head_init)),
                 train, test)
