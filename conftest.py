# lets the tests import model.py, prepare.py ... from the project root
