from tokenformer.cli import main


def test_presets_lists_released_sizes(capsys):
    main(["presets"])
    out = capsys.readouterr().out
    assert "150M" in out and "151.88M" in out and "cpu-1M" in out
    assert "fmnist-0.3M      1x28x28" in out and "0.28M" in out and "cifar-1M" in out
