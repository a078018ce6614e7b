-- The job database schema of ldct-node 0.1 (sqlite), as its Base.metadata.create_all made it
-- before Alembic migrations existed. Used to test that such databases are adopted.
CREATE TABLE series (
	id INTEGER NOT NULL,
	series_instance_uid VARCHAR(64) NOT NULL,
	study_instance_uid VARCHAR(64) NOT NULL,
	calling_aet VARCHAR(16) NOT NULL,
	modality VARCHAR(16),
	n_instances INTEGER NOT NULL,
	n_skipped INTEGER NOT NULL,
	first_received_at DATETIME NOT NULL,
	last_received_at DATETIME NOT NULL,
	state VARCHAR(16) NOT NULL,
	purged_at DATETIME,
	PRIMARY KEY (id),
	UNIQUE (series_instance_uid)
);

CREATE INDEX ix_series_last_received_at ON series (last_received_at);

CREATE TABLE instance (
	id INTEGER NOT NULL,
	sop_instance_uid VARCHAR(64) NOT NULL,
	series_id INTEGER NOT NULL,
	path TEXT NOT NULL,
	sop_class_uid VARCHAR(64) NOT NULL,
	transfer_syntax_uid VARCHAR(64) NOT NULL,
	instance_number INTEGER,
	z_position FLOAT,
	skip_reason VARCHAR(200),
	size_bytes INTEGER NOT NULL,
	received_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (sop_instance_uid),
	FOREIGN KEY(series_id) REFERENCES series (id) ON DELETE CASCADE
);

CREATE INDEX ix_instance_series_id ON instance (series_id);

CREATE TABLE job (
	id INTEGER NOT NULL,
	series_id INTEGER NOT NULL,
	profile VARCHAR(64) NOT NULL,
	state VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	error TEXT,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	started_at DATETIME,
	finished_at DATETIME,
	worker_id VARCHAR(128),
	heartbeat_at DATETIME,
	derived_series_uid VARCHAR(64),
	output_dir TEXT,
	n_instances INTEGER,
	rerun_requested BOOLEAN NOT NULL,
	purged_at DATETIME,
	PRIMARY KEY (id),
	CONSTRAINT uq_job_series_profile UNIQUE (series_id, profile),
	FOREIGN KEY(series_id) REFERENCES series (id) ON DELETE CASCADE
);

CREATE INDEX ix_job_state_updated ON job (state, updated_at);

CREATE TABLE forward (
	id INTEGER NOT NULL,
	job_id INTEGER NOT NULL,
	destination VARCHAR(64) NOT NULL,
	state VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	next_attempt_at DATETIME,
	last_error TEXT,
	n_sent INTEGER NOT NULL,
	updated_at DATETIME NOT NULL,
	sent_at DATETIME,
	PRIMARY KEY (id),
	CONSTRAINT uq_forward_job_dest UNIQUE (job_id, destination),
	FOREIGN KEY(job_id) REFERENCES job (id) ON DELETE CASCADE
);

CREATE INDEX ix_forward_state ON forward (state);
