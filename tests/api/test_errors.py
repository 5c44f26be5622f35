from fastapi.testclient import TestClient


def test_an_unhandled_error_is_a_500_in_the_error_body(db):
    from api.main import create_app

    app = create_app()

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error", "details": None,
                                         "message": "unexpected server error; it has been logged"}}
