"""The seed text's claims about BN, registered before they are run, and verdicts computed from the data.

Each claim is registered here, once: its wording in the seed text, the setup that tests it (data,
model, steps, seeds), what is measured, and one or more criteria with their margins. The notebook
named in the registry measures; it passes each criterion's paired comparison
(:func:`normlab.runtime.evidence.paired`) to :func:`record`, which decides every criterion from its interval
and computes the verdict with :func:`verdict`. No notebook writes a verdict word.

A criterion's outcome is one of

- ``met``: the 95% interval lies on the claimed side of the margin;
- ``reversed``: the interval lies wholly on the *other* side of "no difference" (the data show the
  opposite of the claim), or outside an equivalence window;
- ``not shown``: neither (the interval straddles, or the effect is smaller than the margin);
- ``not tested``: no measurement at this scale.

The verdict, from the outcomes:

- ``not tested``: no criterion was measured;
- ``contested``: two criteria that measure the same thing two ways (the same ``measures``) disagree,
  one met and one reversed;
- ``supported``: every criterion met, and no part of the claim is left untested;
- ``not supported``: no criterion met;
- ``partly``: the rest (some met, or all met but a part of the claim is untested).

``record`` glues the verdict, the results (each criterion's one-line summary and outcome) and an
evidence sentence, so the book's "Claims, checked" page renders what the executed notebooks
measured. The page's setup, criterion and "at scale" columns come from this registry.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

from normlab.runtime.evidence import Paired
from normlab.runtime.glue import glue

VERDICTS = ("supported", "partly", "not supported", "contested", "not tested")
OUTCOMES = ("met", "not shown", "reversed", "not tested")
TESTS = ("above", "below", "within")
_LABEL = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")  # a MyST target such as (ics-lr)=
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Criterion:
    """One registered test of a claim: the interval of ``name``'s comparison against a margin."""

    name: str  # the key under which the notebook passes this comparison to record()
    says: str  # the criterion in words, margin included, as the page shows it
    test: str  # "above", "below" or "within" (see normlab.runtime.evidence)
    margin: float  # a difference (or a ratio, for a ratio comparison) or an equivalence window
    measures: str = ""  # criteria measuring one thing two ways share this; their disagreement is "contested"

    def outcome(self, result: Paired | None) -> str:
        """Decide this criterion from a paired comparison (None: not measured)."""
        if result is None:
            return "not tested"
        if not isinstance(result, Paired):
            raise ValueError(f"criterion {self.name!r} needs a normlab.runtime.evidence.Paired (or None), "
                             f"got {type(result).__name__}")
        if self.test == "above":
            return "met" if result.above(self.margin) else "reversed" if result.below() else "not shown"
        if self.test == "below":
            return "met" if result.below(self.margin) else "reversed" if result.above() else "not shown"
        if result.within(self.margin):
            return "met"
        outside = result.above(self.margin) or result.below(1 / self.margin if result.ratio else -self.margin)
        return "reversed" if outside else "not shown"


@dataclass(frozen=True)
class Claim:
    """A claim as registered before its run: wording, setup, measurement, criteria, where it is run."""

    key: str
    text: str  # the claim as the seed text words it
    notebook: str  # the notebook that measures it, relative to the book's root
    section: str  # the (label)= of the section where it is measured
    setup: str  # data, model, training, number of seeds
    measurement: str  # what is compared, per seed
    criteria: tuple  # of Criterion
    at_scale: str  # what the literature found at full scale (MyST, with {cite})
    untested: str = ""  # a part of the claim no experiment here tests ("" when none)


def verdict(outcomes, *, measures=None, untested=False):
    """Return the verdict for criterion outcomes (a dict name -> outcome); see the module docstring.

    measures: name -> the quantity a criterion measures (criteria sharing one can contest each
    other); untested: whether part of the claim is not tested at all.
    """
    bad = {n: o for n, o in outcomes.items() if o not in OUTCOMES}
    if bad or not outcomes:
        raise ValueError(f"outcomes must be a non-empty dict of {OUTCOMES}, got {outcomes!r}")
    tested = {n: o for n, o in outcomes.items() if o != "not tested"}
    if not tested:
        return "not tested"
    groups = {}
    for name, o in tested.items():
        group = (measures or {}).get(name, "")
        if group:
            groups.setdefault(group, set()).add(o)
    if any({"met", "reversed"} <= seen for seen in groups.values()):
        return "contested"
    met = sum(o == "met" for o in tested.values())
    if met == len(outcomes) and not untested:
        return "supported"
    return "not supported" if met == 0 else "partly"


def _c(name, says, test, margin, measures=""):
    return Criterion(name, says, test, margin, measures)


_CS = "chapters/covariate_shift/lab.ipynb"
_SEEDS = "seeds paired (the same data split, initial weights and batches with and without BN)"
REGISTRY = {c.key: c for c in [
    Claim(
        "ics", "Batch normalization reduces internal covariate shift.", _CS, "ics-measured",
        setup=("8x8 digits (1,347 train / 450 test, split by the seed). 2015 measure: the sigmoid MLP "
               "64-100-100-100-10 of Fig. 1, batch 60, SGD at learning rate 0.5. 2018 measure: a ReLU MLP "
               "with 6 hidden layers of 64, batch 128, SGD at 0.1, plain networks with LeCun and with He "
               "initialization. S" + _SEEDS[1:] + "."),
        measurement=("2015: the drift ratio of 10 last-layer sigmoid inputs (range of the median over training "
                     "/ mean 15-85 spread), median over the units. 2018: the relative change of layer i's "
                     "gradient when layers 1..i-1 take their SGD step, at step 1, median over layers 2-7; and "
                     "the same when layers 1..i-1 instead move an l2 distance of 0.1 along their gradient, "
                     "equal in every network (about the BN and He networks' own step-1 updates, 0.07-0.26, "
                     "in a pilot at seed 0)."),
        criteria=(
            _c("drift", "2015 measure: plain / BN drift ratio, geometric mean, 95% CI above 2", "above", 2.0,
               "ics"),
            _c("gradient", "2018 measure: BN / plain gradient change at step 1, geometric mean, 95% CI below 1",
               "below", 1.0, "ics"),
            _c("gradient_he", "2018 measure: BN / He-initialized plain gradient change at step 1, geometric mean, "
               "95% CI below 1", "below", 1.0, "ics"),
            _c("gradient_equal", "2018 measure, earlier layers moved 0.1 in every network: BN / He-initialized "
               "plain gradient change at step 1, geometric mean, 95% CI below 1", "below", 1.0, "ics"),
        ),
        at_scale=("On MNIST the 2015 paper shows the drift and its removal {cite}`ioffe2015batch`; on VGG and "
                  "CIFAR-10, measured through gradients, BN networks showed similar or larger ICS "
                  "{cite}`santurkar2018how`."),
    ),
    Claim(
        "higher_lr", "Batch normalization allows higher learning rates.", _CS, "ics-lr",
        setup=("The Fig. 1 sigmoid MLP on the digits, SGD, batch 60, learning rates 0.1 to 100 on a grid "
               "stepping by about 3, the same steps at every rate; and a ReLU MLP (3 hidden layers of 100), "
               "rates 0.03 to 10, BN against plain networks with LeCun and with He initialization; "
               + _SEEDS + "."),
        measurement="Per seed, the largest rate on the grid at which test accuracy reaches 90% within the budget.",
        criteria=(
            _c("max_lr", "BN / plain largest workable rate, geometric mean, 95% CI above 2 (one grid step is about 3)",
               "above", 2.0),
            _c("max_lr_relu", "ReLU MLP: BN / He-initialized plain largest workable rate, geometric mean, 95% CI "
               "above 2", "above", 2.0),
        ),
        at_scale=("On Inception, BN trained at 5 and 30 times the base rate, and BN-x5 reached the baseline's "
                  "accuracy in 14 times fewer steps {cite}`ioffe2015batch`."),
    ),
    Claim(
        "fewer_epochs", "Batch normalization dramatically reduces the number of training epochs needed.", _CS,
        "ics-fig1",
        setup=("The Fig. 1 sigmoid MLP on the digits, SGD at one learning rate (0.5) for both, batch 60; and "
               "a ReLU MLP (3 hidden layers of 100), BN against a He-initialized plain network, each at its "
               "fastest rate on the grid 0.03 to 10; " + _SEEDS + "."),
        measurement=("Per seed, the steps until test accuracy first reaches 90% (a run that never gets there "
                     "counts as the budget, so the ratio is then a lower bound)."),
        criteria=(
            _c("steps", "plain / BN steps to 90%, geometric mean, 95% CI above 3 ('dramatically': at least 3x)",
               "above", 3.0),
            _c("steps_relu", "ReLU MLP, each at its fastest rate: He-initialized plain / BN steps to 90%, geometric "
               "mean, 95% CI above 3", "above", 3.0),
        ),
        at_scale=("Inception with BN-x5 reached 72.2% top-1 in 14 times fewer steps than without BN "
                  "{cite}`ioffe2015batch`."),
    ),
    Claim(
        "regularizes", "Batch normalization acts as a regularizer and reduces the need for dropout.",
        "chapters/regularization/lab_noise.ipynb", "reg-dropout",
        setup=("MNIST-1D, 1,000 training examples (the generator and the subset follow the seed), an MLP with 2 "
               "hidden layers of 128 ReLUs, SGD. Gap: batch 8, lr 0.05 B / 32, equal epochs, BN vs population "
               "norm (BN's normalization with fixed statistics, so no batch noise). Dropout: batch 32, lr 0.02, "
               "p = 0.5; " + _SEEDS.replace("with and without BN", "for every configuration") + "."),
        measurement=("Train-minus-test accuracy (the gap) and test accuracy, per seed; test accuracy of BN, "
                     "dropout, and BN with dropout after its last BN layer."),
        criteria=(
            _c("gap", "regularizer: population norm's gap minus BN's at B = 8, 95% CI above 0 points", "above", 0.0),
            _c("test", "better test accuracy: BN minus population norm at B = 8, 95% CI above 0 points",
               "above", 0.0),
            _c("vs_dropout", "BN minus dropout alone, test accuracy, 95% CI above 0 points", "above", 0.0),
            _c("dropout_on_bn", "less need for dropout: BN + dropout (after the last BN) minus BN, "
               "95% CI below +1 point", "below", 1.0),
        ),
        at_scale=("On CIFAR-100, a DenseNet scored 77.4% without dropout and 68.6% with dropout 0.5 after BN "
                  "{cite}`li2019understanding`; BN's regularization falls with the batch size "
                  "{cite}`luo2019towards`."),
    ),
    Claim(
        "placement", "Batch normalization belongs after the linear layer and before the activation.",
        "chapters/pytorch/lab.ipynb", "pytorch-lab-placement",
        setup=("A small CNN (two 3x3 conv layers of 16 and 32 channels, global average pooling, a linear "
               "layer) on the digits as 8x8 images, BN before or after each ReLU, at two heads that both "
               "placements share: the pool sees ReLU outputs (plain head) or a BN's output (BN head). SGD "
               "with momentum 0.9, batch 64, 500 steps; each of the four networks gets its own learning "
               "rate, tuned the same way (the grid 0.1, 0.2, 0.4, two tuning seeds, 300 training examples "
               "held out, validation accuracy with recomputed statistics); "
               + _SEEDS.replace("with and without BN", "for all four networks") + "."),
        measurement=("Test accuracy per seed of each network at its tuned rate, once with the EMA statistics "
                     "training left and once with statistics recomputed over the training set."),
        criteria=(
            _c("plain_precise", "plain head, recomputed statistics: before minus after, 95% CI above 0 points",
               "above", 0.0, "accuracy"),
            _c("bn_precise", "BN head, recomputed statistics: before minus after, 95% CI above 0 points",
               "above", 0.0, "accuracy"),
            _c("plain_ema", "plain head, EMA statistics: before minus after, 95% CI above 0 points", "above", 0.0,
               "accuracy"),
            _c("bn_ema", "BN head, EMA statistics: before minus after, 95% CI above 0 points", "above", 0.0,
               "accuracy"),
        ),
        at_scale=("The 2015 paper puts BN before the nonlinearity {cite}`ioffe2015batch`; ResNet v2 keeps it before "
                  "the ReLU but moves the pair in front of each convolution {cite}`he2016identity`; no large-scale "
                  "ablation settles it for every architecture."),
        untested="one small CNN on one dataset cannot show where BN belongs in every network",
    ),
    Claim(
        "small_batches", "Batch normalization depends on the batch size and struggles with small batches.",
        "chapters/small_batches/lab.ipynb", "sb-lab-error",
        setup=("Wu and He's regime, small: the optimizer batch fixed at 32 digits and BN's statistics computed per "
               "group of B = 2 to 32 examples within it, equal steps (200 at quick scale, SGD with momentum); BN, "
               "batch renorm, GroupNorm (4 groups) and LayerNorm after each hidden layer of a small CNN (3x3 "
               "convolutions of 8 and 16 channels: a statistic averages 64B and 16B values) and of an MLP (2 "
               "hidden layers of 128: B values per statistic, the extreme case); every seed starts all of "
               "them from the same weights and batches."),
        measurement="Test error (%) in eval mode, per seed, network and group size.",
        criteria=(
            _c("cnn_gap", "CNN: BN's error at B = 2 minus at B = 32, 95% CI above 0 points", "above", 0.0),
            _c("cnn_vs_gn", "CNN: BN's error minus GroupNorm's at B = 2, 95% CI above 0 points", "above", 0.0),
            _c("mlp_gap", "MLP: BN's error at B = 2 minus at B = 32, 95% CI above 15 points", "above", 15.0),
        ),
        at_scale=("ResNet-50 on ImageNet: BN's error rose from 23.6% at 32 images per GPU to 34.7% at 2, "
                  "GroupNorm's stayed near 24% {cite}`wu2018group`; there each statistic still averages "
                  "2·H·W values and the optimizer batch stayed large."),
    ),
    Claim(
        "rnn_bn", "Batch normalization is less effective in recurrent networks.",
        "chapters/alternatives/lab_rnn.ipynb", "alt-lab-rnn-task",
        setup=("The digits read row by row (8 steps of 8 pixels), an LSTM with 64 hidden units, Adam at "
               "0.005, batch 32; no normalization, LayerNorm, and BN with statistics per time step "
               "(Cooijmans et al.'s recurrent BN); one split per notebook seed, and each model seed fixes the "
               "batch order of all three models."),
        measurement="Final test accuracy per seed on sequences of the training length, and on sequences twice as long.",
        criteria=(
            _c("train_length", "training length: LayerNorm minus per-step BN, 95% CI above 0 points", "above", 0.0),
            _c("longer", "twice as long: LayerNorm minus per-step BN, 95% CI above 0 points", "above", 0.0),
        ),
        at_scale=("Recurrent BN with per-step statistics trained faster than an unnormalized LSTM on "
                  "sequential MNIST and language modelling {cite}`cooijmans2017recurrent`; LayerNorm was "
                  "proposed for recurrent networks because it needs no per-step statistics "
                  "{cite}`ba2016layer`."),
    ),
    Claim(
        "rnn_ln", "Layer normalization is better suited to recurrent networks.",
        "chapters/alternatives/lab_rnn.ipynb", "alt-lab-rnn-long",
        setup="The LSTM experiment of this section: digits row by row, 64 hidden units, Adam at 0.005, batch 32.",
        measurement=("Test accuracy per seed early in training (the second evaluation) and at the end; the "
                     "accuracy lost on sequences twice as long."),
        criteria=(
            _c("early", "early: LayerNorm minus no normalization, 95% CI above 10 points", "above", 10.0),
            _c("final", "final: LayerNorm minus per-step BN, 95% CI above 0 points", "above", 0.0),
            _c("longer", "twice as long: per-step BN's loss minus LayerNorm's, 95% CI above 0 points", "above", 0.0),
        ),
        at_scale=("Ba et al. report faster convergence with LayerNorm on several recurrent tasks "
                  "{cite}`ba2016layer`; it is the normalization of Transformers, which are not recurrent."),
    ),
    Claim(
        "style_in", "Instance normalization suits style transfer.",
        "chapters/alternatives/lab_style.ipynb", "alt-lab-style",
        setup=("A fixed random conv feature net as the loss network. (1) 3 digits enlarged to 32x32 as content, "
               "2 synthetic textures as style, pixels optimized with Adam towards the style's instance "
               "statistics. (2) Ulyanov et al.'s test, scaled down: a 3-layer feed-forward stylization network "
               "with instance, batch or no normalization, trained on training digits enlarged to 16x16 towards one "
               "texture (content + style loss, Adam), judged on the test digits, which it never saw; every seed "
               "starts the three networks from the same weights and batches."),
        measurement=("(1) Per digit-texture pair: AdaIN's largest error in the target statistics, and the style "
                     "loss after optimization over the loss before. (2) Per seed: the mean style loss on the "
                     "held-out digits, in eval mode."),
        criteria=(
            _c("adain", "AdaIN sets each channel's instance mean and sd exactly: largest error, 95% CI below 1e-5",
               "below", 1e-5),
            _c("style_loss", "style loss after / before, geometric mean, 95% CI below 0.2", "below", 0.2),
            _c("net_in_bn", "stylization network, held-out style loss with IN / with BN, geometric mean, 95% CI "
               "below 1", "below", 1.0),
            _c("net_in_none", "stylization network, held-out style loss with IN / without normalization, "
               "geometric mean, 95% CI below 1", "below", 1.0),
        ),
        at_scale=("Replacing BN by InstanceNorm in a feed-forward style-transfer generator improved the "
                  "stylized images markedly {cite}`ulyanov2016instance`; the comparison was qualitative."),
        untested="photographs, and a pretrained loss network (Ulyanov et al. used VGG features)",
    ),
    Claim(
        "transfer", "Batch normalization helps transfer learning, particularly when the new dataset is small.",
        "chapters/transfer/lab_baselines.ipynb", "tr-lab-baselines",
        setup=("A small 1-D CNN (three bias-free valid convolutions of 32 channels) trained on MNIST-1D, the "
               "source, with BN, with no normalization, with GroupNorm (4 groups) and with InstanceNorm, each "
               "at the rate its clean source accuracy chose, 600 SGD steps. Targets: added Gaussian noise (sd "
               "0.5), MNIST-1D drawn with other generator parameters, and a corruption suite of blur, noise and "
               "contrast at three severities; AdaBN re-estimates BN's statistics on unlabelled target data. The "
               "affine shift 2x + 1 is left out of the criteria: with a bias-free first layer AdaBN undoes it "
               "by construction (an identity, asserted on its own). Fine-tuning: every layer of the BN and the "
               "no-BN network on n = 10 to 1,000 labelled target examples (quick scale: 10, 100, 1,000), the "
               "rate chosen on the n alone; " + _SEEDS + "."),
        measurement=("Target test accuracy per seed: with the source statistics and with AdaBN's, and of the "
                     "network without BN; after fine-tuning on n labels, BN's accuracy minus the no-BN "
                     "network's (BN's advantage)."),
        criteria=(
            _c("adabn_noise", "AdaBN minus the source model on the noise shift, 95% CI above 0 points",
               "above", 0.0),
            _c("adabn_generator", "AdaBN minus the source model on the generator shift, 95% CI above 0 points",
               "above", 0.0),
            _c("vs_none_noise", "BN with AdaBN minus the CNN without normalization on the noise shift, 95% CI "
               "above 0 points", "above", 0.0),
            _c("vs_none_generator", "BN with AdaBN minus the CNN without normalization on the generator shift, "
               "95% CI above 0 points", "above", 0.0),
            _c("vs_none_suite", "BN with AdaBN minus the CNN without normalization, mean over the nine "
               "corruptions, 95% CI above 0 points", "above", 0.0),
            _c("small_noise", "noise shift: BN's fine-tuned advantage over no BN at the smallest n minus at the "
               "largest, 95% CI above 0 points", "above", 0.0),
            _c("small_generator", "generator shift: BN's fine-tuned advantage over no BN at the smallest n minus "
               "at the largest, 95% CI above 0 points", "above", 0.0),
        ),
        at_scale=("AdaBN raised Office-31's average accuracy from 75.5% to 76.7% {cite}`li2016revisiting`; "
                  "re-estimating BN statistics cut ResNet-50's ImageNet-C error from 76.7 to 62.2 mCE "
                  "{cite}`schneider2020improving`."),
    ),
    Claim(
        "future", "Batch normalization is likely to remain a fundamental component of deep networks.",
        "chapters/beyond/lab_normfree.ipynb", "nf-train",
        setup=("8x8 digits (1,347 train / 450 test, split by the seed). One pre-activation residual MLP of 12 blocks "
               "(26 weight layers, width 32), kept trainable six ways: BN, no normalization, SkipInit, Fixup, weight "
               "standardization with GroupNorm, and NF-ResNets' scaled weight standardization with adaptive gradient "
               "clipping (0.1). SGD with momentum 0.9, batch 64, 150 steps, at each of the rates 0.03, 0.1 and 0.3; "
               "each method at the rate with the lowest median final training loss; " + _SEEDS + "."),
        measurement=("Test accuracy per seed: BN's minus each normalizer-free method's, each at its own rate. BN "
                     "remains fundamental here if no method that drops it trains the network to a clearly higher "
                     "accuracy: a non-inferiority test with a margin of 1 point, fixed before the run."),
        criteria=(
            _c("vs_fixup", "BN minus Fixup, 95% CI above -1 point", "above", -1.0),
            _c("vs_skipinit", "BN minus SkipInit, 95% CI above -1 point", "above", -1.0),
            _c("vs_ws_gn", "BN minus weight standardization with GroupNorm, 95% CI above -1 point", "above", -1.0),
            _c("vs_nf", "BN minus NF with AGC, 95% CI above -1 point", "above", -1.0),
        ),
        at_scale=("Fixup trained residual networks of 10,000 layers without normalization {cite}`zhang2019fixup`; "
                  "NFNets matched EfficientNet-B7's ImageNet accuracy while training up to 8.7 times faster, "
                  "without BN {cite}`brock2021high`; transformers use LayerNorm {cite}`ba2016layer` or none "
                  "{cite}`zhu2025transformers`."),
        untested=("the future itself, and the models where BN was replaced: transformers, large-batch image "
                  "models, small batches (Chapter 5)"),
    ),
]}
CLAIMS = {key: c.text for key, c in REGISTRY.items()}  # key -> the claim, in the order the seed text makes them


@dataclass(frozen=True)
class Record:
    """One claim's measured results and computed verdict, as a notebook recorded it."""

    key: str
    claim: str
    outcomes: dict  # criterion name -> outcome
    results: str  # per criterion, by name: its summary and outcome (the page lists the criteria' words)
    verdict: str
    evidence: str


def outcome(key, name, result):
    """Decide one registered criterion of a claim from its paired result (for the text before record)."""
    if key not in REGISTRY:
        raise ValueError(f"unknown claim {key!r}; the claims are {', '.join(REGISTRY)}")
    found = [c for c in REGISTRY[key].criteria if c.name == name]
    if not found:
        raise ValueError(f"claim {key!r} has no criterion {name!r}; it has {[c.name for c in REGISTRY[key].criteria]}")
    return found[0].outcome(result)


def record(key, results, evidence):
    """Decide a registered claim's criteria from paired results, glue and print the verdict; return the Record.

    results: criterion name -> normlab.runtime.evidence.Paired (or None where not measured at this scale),
    one for every criterion the registry declares for the claim. evidence: one sentence with the
    numbers, for the page.
    """
    if key not in REGISTRY:
        raise ValueError(f"unknown claim {key!r}; the claims are {', '.join(REGISTRY)}")
    claim = REGISTRY[key]
    names = [c.name for c in claim.criteria]
    if not isinstance(results, dict) or sorted(results) != sorted(names):
        got = sorted(results) if isinstance(results, dict) else type(results).__name__
        raise ValueError(f"claim {key!r} is registered with criteria {names}; results must give each, got {got}")
    if not isinstance(evidence, str) or not evidence.strip():
        raise ValueError(f"evidence must be a non-empty sentence, got {evidence!r}")
    outcomes = {c.name: c.outcome(results[c.name]) for c in claim.criteria}
    lines = [f"{c.says}: {_summary(results[c.name], c)} ({outcomes[c.name]})" for c in claim.criteria]
    short = [f"{c.name}: {_summary(results[c.name], c)} ({outcomes[c.name]})" for c in claim.criteria]
    word = verdict(outcomes, measures={c.name: c.measures for c in claim.criteria}, untested=bool(claim.untested))
    rec = Record(key, claim.text, outcomes, "; ".join(short) + ".", word, evidence.strip())
    for field in ("claim", "results", "verdict", "evidence"):
        glue(f"claim_{key}_{field}", getattr(rec, field), display=False, quiet=True)
    for name, outcome in outcomes.items():
        glue(f"claim_{key}_{name}", outcome, display=False, quiet=True)
    printed = [f"Claim ({key}): {rec.claim}", *(f"  {line}" for line in lines), f"  Verdict: {word}. {rec.evidence}"]
    # at most 88 characters a line, the width of the website's code column
    print("\n".join(textwrap.fill(line, 88, subsequent_indent="    ", break_long_words=False,
                                   break_on_hyphens=False) for line in printed))
    return rec


def _summary(result, criterion):
    """The result's one-line summary, in a notation that can show the criterion's margin."""
    if result is None:
        return "not measured"
    tiny = 0 < abs(criterion.margin) < 0.01 and not result.ratio
    small_ratio = result.ratio and criterion.margin < 1  # e.g. 0.015x against a margin of 0.2
    return result.summary(digits=3 if small_ratio else 1, scientific=tiny)


def check_registry():
    """Raise ValueError if a registered claim is malformed (a test calls this)."""
    for key, c in REGISTRY.items():
        if key != c.key or not _NAME.fullmatch(key):
            raise ValueError(f"registry key {key!r} does not match its claim's key {c.key!r}")
        if not c.text.endswith(".") or not _LABEL.fullmatch(c.section) or not c.notebook.endswith(".ipynb"):
            raise ValueError(f"claim {key!r}: text must be a sentence, section a label, notebook a .ipynb path")
        if not (c.setup and c.measurement and c.at_scale and c.criteria):
            raise ValueError(f"claim {key!r}: setup, measurement, criteria and at_scale are all required")
        names = [cr.name for cr in c.criteria]
        if len(set(names)) != len(names):
            raise ValueError(f"claim {key!r}: criterion names repeat: {names}")
        for cr in c.criteria:
            if not _NAME.fullmatch(cr.name) or cr.test not in TESTS or not cr.says:
                raise ValueError(f"claim {key!r}, criterion {cr.name!r}: needs a name, words and a test in {TESTS}")
