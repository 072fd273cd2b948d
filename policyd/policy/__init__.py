"""Policy files at run time: hot reload, and the policy tests runner (`*_test.yaml`)."""
