"""log.py: the package logger and a run's log file (RunLog)."""
import logging
import sys

from torchreid_ext.log import PACKAGE_LOGGER, RunLog

logger = logging.getLogger("torchreid_ext.test_log")


def test_run_log_keeps_early_output_and_copies_both_streams(tmp_path, capsys):
    path = tmp_path / "sub" / "train.log"
    with RunLog() as log:
        logger.info("before the file")
        print("a print")
        log.record("pending record\n")
        assert not path.parent.exists()  # nothing written before open
        log.open(str(path))
        print("to stderr", file=sys.stderr)
        logger.info("after the file")
        log.record("error: only in the file\n")
    out, err = capsys.readouterr()
    assert out == "before the file\na print\nafter the file\n" and err == "to stderr\n"
    assert path.read_text() == ("before the file\na print\npending record\nto stderr\nafter the file\n"
                                "error: only in the file\n")
    print("after the block")
    assert "after the block" not in path.read_text()


def test_run_log_without_open_writes_nothing_and_disabled_discards(tmp_path, capsys):
    with RunLog():
        print("kept on the console")
    with RunLog(enabled=False) as log:
        print("discarded")
        log.open(str(tmp_path / "x.log"))
    assert capsys.readouterr().out == "kept on the console\n"
    assert list(tmp_path.iterdir()) == []


def test_a_silenced_console_still_leaves_the_log_file_complete(tmp_path, capsys):
    pkg = logging.getLogger(PACKAGE_LOGGER)
    level = pkg.level
    pkg.setLevel(logging.WARNING)  # the user silences our lines
    try:
        with RunLog() as log:
            log.open(str(tmp_path / "train.log"))
            logger.info("info line")
            print("a print")
            logger.warning("a warning")
        assert pkg.level == logging.WARNING and all(h.level == logging.NOTSET for h in pkg.handlers)
        logger.info("after the run")
    finally:
        pkg.setLevel(level)
    assert capsys.readouterr().out == "a print\na warning\n"
    assert (tmp_path / "train.log").read_text() == "info line\na print\na warning\n"


def test_a_redirected_logger_keeps_its_handlers_and_the_log_file(tmp_path, capsys):
    pkg = logging.getLogger(PACKAGE_LOGGER)
    saved = pkg.handlers[:]
    mine = logging.FileHandler(tmp_path / "mine.log")
    pkg.handlers[:] = [mine]
    try:
        with RunLog() as log:
            log.open(str(tmp_path / "train.log"))
            logger.info("redirected")
    finally:
        pkg.handlers[:] = saved
        mine.close()
    assert capsys.readouterr().out == ""
    assert (tmp_path / "train.log").read_text() == "redirected\n"
    assert (tmp_path / "mine.log").read_text() == "redirected\n"


def test_show_output_installs_the_console_handler_only_where_no_handler_would_show_a_line(monkeypatch, capsys):
    """A plain script (no handler on the package logger or root) gets ours, once; configured logging
    (root's handler from basicConfig, or the commands' console handler) gets none: no line twice."""
    from torchreid_ext.log import ConsoleHandler, show_output

    pkg, root = logging.getLogger(PACKAGE_LOGGER), logging.getLogger()
    monkeypatch.setattr(pkg, "handlers", [])
    monkeypatch.setattr(pkg, "propagate", True)
    monkeypatch.setattr(pkg, "level", logging.NOTSET)
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(sys.stdout)])  # basicConfig
    show_output()
    assert pkg.handlers == [] and pkg.propagate
    monkeypatch.setattr(root, "handlers", [])  # a plain script
    show_output()
    show_output()
    assert [type(h) for h in pkg.handlers] == [ConsoleHandler] and not pkg.propagate
    logger.info("shown once")
    assert capsys.readouterr().out == "shown once\n"
