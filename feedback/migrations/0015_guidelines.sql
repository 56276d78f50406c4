-- Written guidelines per model, versioned (an admin publishes a new version; none is ever edited),
-- who read which version, and the version each verdict was given under.
CREATE TABLE guidelines (
    model_name text        NOT NULL,
    version    integer     NOT NULL CHECK (version >= 1),
    markdown   text        NOT NULL CHECK (length(markdown) BETWEEN 1 AND 100000),
    created_by integer     REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, version)
);

CREATE TABLE guidelines_read (
    user_id    integer     NOT NULL REFERENCES users (id),
    model_name text        NOT NULL,
    version    integer     NOT NULL,
    read_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, model_name, version),
    FOREIGN KEY (model_name, version) REFERENCES guidelines (model_name, version)
);

ALTER TABLE annotations ADD COLUMN guidelines_version integer;
