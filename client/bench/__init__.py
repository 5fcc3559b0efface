"""The scaling study behind `rmidl bench`: run configurations (study), describe them (results, machine),
predict clusters (predict), and report (derived, tables, forecast, plots with the optional matplotlib)."""
