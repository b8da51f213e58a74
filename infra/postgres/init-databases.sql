-- One database per server, made on the first start of the PostgreSQL volume.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
