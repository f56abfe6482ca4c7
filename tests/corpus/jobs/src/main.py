"""Trains an SVM on the iris data (the corpus only submits it; it does not run)."""
import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--iris-csv")
parser.add_argument("--C", type=float, default=1.0)
parser.add_argument("--kernel", default="rbf")
parser.add_argument("--coef0", type=float, default=0.0)
print(parser.parse_args())
