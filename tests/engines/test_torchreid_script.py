"""A Torchreid user's script, as Torchreid's README writes it, with only its engine line changed to
ours, shows on stdout what Torchreid's own engine shows: training progress, the results (mAP,
Rank-1) and a line per checkpoint (issue 31, case 14). The script configures no logging."""
import os
import subprocess
import sys

SCRIPT = """
import torchreid_ext
from torchreid_ext.adapter import torchreid as _layout

torchreid = _layout()  # `import torchreid`, whichever layout is installed

datamanager = torchreid.data.ImageDataManager(
    root={root!r}, sources="synthreid_small", targets="synthreid_small", height=64, width=32,
    batch_size_train=16, batch_size_test=64, workers=0, transforms=["random_flip"],
    train_sampler="RandomIdentitySampler", num_instances=4,
)
# Torchreid's engine, then the same script with ours: one process, so the first cannot see the
# handler the second may install
for engine_class in (torchreid.engine.ImageTripletEngine, torchreid_ext.engines.ImageDRSLEngine):
    print("=== " + engine_class.__name__, flush=True)
    model = torchreid.models.build_model(name="osnet_x0_25", num_classes=datamanager.num_train_pids,
                                         loss="triplet", pretrained=False)
    optimizer = torchreid.optim.build_optimizer(model, optim="adam", lr=0.0003)
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, lr_scheduler="single_step", stepsize=20)
    engine = engine_class(datamanager, model, optimizer=optimizer, scheduler=scheduler, label_smooth=True)
    engine.run(save_dir={save!r} + "/" + engine_class.__name__, max_epoch=1, eval_freq=1, print_freq=2)
"""

# what Torchreid's engine prints, once each in this run
SHOWN = ["=> Start training", "epoch: [1/1][2/", "##### Evaluating synthreid_small (source) #####", "** Results **",
         "\nmAP: ", "\nRank-1  : ", "\nRank-20 : ", 'Checkpoint saved to "', "=> Final test", "\nElapsed "]


def test_a_torchreid_script_with_our_engine_shows_what_torchreids_shows(data_root, tmp_path):
    script = SCRIPT.format(root=data_root, save=str(tmp_path / "log"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, theirs, ours = proc.stdout.split("=== ")
    assert theirs.startswith("ImageTripletEngine") and ours.startswith("ImageDRSLEngine")
    for line in SHOWN:
        assert theirs.count(line) == 1, (line, theirs)  # the test's premise: Torchreid shows it
        assert ours.count(line) == 1, (line, ours)  # shown, and not twice
    assert ours.count('Checkpoint updated "') == 1  # the last checkpoint records the final rank-1
    assert "** Results **" not in proc.stderr and "=> Start training" not in proc.stderr
