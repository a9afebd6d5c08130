-- a second database in the same server for shared Optuna studies
CREATE DATABASE optuna OWNER qi;
