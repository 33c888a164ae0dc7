# SimpleVLA-RL's RobDataParallelPPOActor (dp_rob.py, commit 7c51662) with docs/simplevla_rl.md §3
# applied, as a user would apply it. Not SimpleVLA-RL code: only the two patched methods live here;
# every other method is inherited from the unmodified copy in dp_rob.py. Lines the doc's
# pseudo-diff adds or changes are marked `# PCM`; the rest is upstream's update_policy verbatim.
#
# The doc's first recipe (their compute_policy_loss, rescaled) is PCMRobDataParallelPPOActor;
# its second recipe ("one call to our loss", pcm_train.algorithm.grpo.policy_loss, which needs verl >= 0.9
# importable as `verl` -- true in this test process, not in SimpleVLA-RL's) is
# PCMLossRobDataParallelPPOActor, with the doc's unbiased-estimator variant.
import torch
from omegaconf import OmegaConf

from verl import DataProto  # the installed verl >= 0.9 here; SimpleVLA-RL's fork in its own processes

from simplevla_rl import core_algos
from simplevla_rl.dp_rob import RobDataParallelPPOActor
from simplevla_rl.py_functional import append_to_dict

from pcm_train.config import PCMSection  # PCM
from pcm_train.algorithm.controller import PCMController  # PCM
from pcm_train.algorithm.grpo import policy_loss  # PCM (second recipe only)
from pcm_train.simplevla import pcm_shrink_batch  # PCM

BASE_SEED = 0  # PCM: the doc's `base_seed`, left to the user


class PCMRobDataParallelPPOActor(RobDataParallelPPOActor):

    def __init__(self, config, actor_module, actor_optimizer=None):
        super().__init__(config, actor_module, actor_optimizer)
        if actor_optimizer is not None:  # PCM: the same class also serves as the reference policy
            cfg = PCMSection(**OmegaConf.to_container(self.config.pcm, resolve=True)); cfg.validate("pcm")  # PCM
            self.pcm_controller = PCMController(cfg, seed=BASE_SEED + torch.distributed.get_rank())  # PCM

    def update_policy(self, data: DataProto):
        self.actor_module.train()

        assert self.config.ppo_mini_batch_size % self.config.ppo_micro_batch_size == 0
        self.gradient_accumulation = self.config.ppo_mini_batch_size // self.config.ppo_micro_batch_size
        temperature = data.meta_info['temperature']  # temperature must be in the data.meta_info to avoid slient error

        assert not self.config.use_proprio                    # kept rows carry no 'proprio'  # PCM
        kept, selection = pcm_shrink_batch(data, self.pcm_controller)  # PCM
        kb, counts, num_traj = kept.batch, kept.meta_info['traj_token_counts'], kept.meta_info['num_traj']  # PCM
        assert self.config.ppo_micro_batch_size == 1

        # Split to make minibatch iterator for updating the actor
        # See PPO paper for details. https://arxiv.org/abs/1707.06347
        metrics = {}
        append_to_dict(metrics, selection.metrics)  # PCM
        for start in range(0, num_traj, self.config.ppo_mini_batch_size):   # one optimizer step  # PCM

            self.actor_optimizer.zero_grad()

            for t in range(start, min(start + self.config.ppo_mini_batch_size, num_traj)):  # PCM
                rows = (kb['traj_index'] == t).nonzero().squeeze(-1)       # this trajectory's kept chunks  # PCM

                #clip_ratio = self.config.clip_ratio
                clip_ratio_high = self.config.clip_ratio_high
                clip_ratio_low = self.config.clip_ratio_low
                entropy_coeff = self.config.entropy_coeff

                loss_info = {
                    #'actor/entropy_loss': entropy_loss.detach().item(),
                    'actor/pg_loss':0,
                    'actor/pg_clipfrac': 0,
                    'actor/ppo_kl': 0,
                }

                for i in range(0, len(rows), self.config.traj_mini_batch_size):  # PCM
                    mb = kb[rows[i:i + self.config.traj_mini_batch_size]].cuda()  # PCM

                    entropy, log_prob = self._forward_micro_batch_update(input_ids=mb['input_ids'],  # PCM
                                                                         attention_mask=mb['attention_mask'],  # PCM
                                                                         pixel_values=mb['pixel_values'],  # PCM
                                                                         responses=mb['responses'],  # PCM
                                                                         temperature=temperature,
                                                                         proprio=None)  # log_prob: (1, rows*56)  # PCM

                    response_mask_tmp = mb['response_mask'].reshape(1, -1)  # PCM

                    pg_loss, pg_clipfrac, ppo_kl = core_algos.compute_policy_loss(old_log_prob=mb['old_log_probs'].reshape(1, -1),  # PCM
                                                                            log_prob=log_prob,
                                                                            advantages=mb['advantages'].reshape(1, -1),  # PCM
                                                                            eos_mask=response_mask_tmp,
                                                                            clip_ratio_high=clip_ratio_high,
                                                                            clip_ratio_low=clip_ratio_low)

                    response_mask_tmp_sum = response_mask_tmp.sum(axis=None)
                    pg_clipfrac = pg_clipfrac* response_mask_tmp_sum / counts[t]  # PCM
                    ppo_kl = ppo_kl* response_mask_tmp_sum / counts[t]  # PCM

                    policy_loss = pg_loss * response_mask_tmp.sum() / counts[t]   # token-mean within trajectory t  # PCM

                    loss = policy_loss / self.gradient_accumulation                 # mean over trajectories

                    loss.backward()

                    loss_info['actor/pg_loss'] =  loss_info['actor/pg_loss'] + policy_loss.detach().item()
                    loss_info['actor/pg_clipfrac'] = loss_info['actor/pg_clipfrac'] + pg_clipfrac.detach().item()
                    loss_info['actor/ppo_kl'] = loss_info['actor/ppo_kl'] +  ppo_kl.detach().item()

                append_to_dict(metrics, loss_info)

            grad_norm = self._optimizer_step()
            data = {'actor/grad_norm': grad_norm.detach().item()}
            append_to_dict(metrics, data)
            torch.cuda.empty_cache()
        self.actor_optimizer.zero_grad()
        torch.cuda.synchronize()
        torch.distributed.barrier()
        torch.cuda.empty_cache()
        return metrics


class PCMLossRobDataParallelPPOActor(PCMRobDataParallelPPOActor):
    """The doc's second recipe: one call to pcm_train.algorithm.grpo.policy_loss replaces each slice's
    compute_policy_loss + rescale + `/ self.gradient_accumulation`, counts zeroed outside the
    mini-batch through `num_sequences=stop - start`; with `pcm.estimator=unbiased` (kept rows carry
    `chunk_weight`) the doc's weights and `traj_valid_tokens`."""

    def update_policy(self, data: DataProto):
        self.actor_module.train()

        assert self.config.ppo_mini_batch_size % self.config.ppo_micro_batch_size == 0
        self.gradient_accumulation = self.config.ppo_mini_batch_size // self.config.ppo_micro_batch_size
        temperature = data.meta_info['temperature']  # temperature must be in the data.meta_info to avoid slient error

        assert not self.config.use_proprio                    # kept rows carry no 'proprio'  # PCM
        kept, selection = pcm_shrink_batch(data, self.pcm_controller)  # PCM
        kb, counts, num_traj = kept.batch, kept.meta_info['traj_token_counts'], kept.meta_info['num_traj']  # PCM
        unbiased = 'chunk_weight' in kb.keys()  # PCM: the doc's "Unbiased estimator"
        if unbiased:  # PCM
            counts = kept.meta_info['traj_valid_tokens']  # PCM
        assert self.config.ppo_micro_batch_size == 1

        metrics = {}
        append_to_dict(metrics, selection.metrics)  # PCM
        for start in range(0, num_traj, self.config.ppo_mini_batch_size):   # one optimizer step  # PCM

            self.actor_optimizer.zero_grad()
            stop = min(start + self.config.ppo_mini_batch_size, num_traj)  # PCM

            for t in range(start, stop):  # PCM
                rows = (kb['traj_index'] == t).nonzero().squeeze(-1)       # this trajectory's kept chunks  # PCM
                clip_ratio_high = self.config.clip_ratio_high
                clip_ratio_low = self.config.clip_ratio_low

                for i in range(0, len(rows), self.config.traj_mini_batch_size):  # PCM
                    mb = kb[rows[i:i + self.config.traj_mini_batch_size]].cuda()  # PCM
                    entropy, log_prob = self._forward_micro_batch_update(
                        input_ids=mb['input_ids'], attention_mask=mb['attention_mask'],
                        pixel_values=mb['pixel_values'], responses=mb['responses'],
                        temperature=temperature, proprio=None)                 # log_prob: (1, rows*56)

                    m = mb['response_mask']  # PCM
                    weights = mb['chunk_weight'][:, None].expand_as(m)[m] if unbiased else None  # PCM
                    loss, loss_metrics = policy_loss(log_prob.view(m.shape)[m], mb['old_log_probs'][m], mb['advantages'][m],  # PCM
                        mb['traj_index'][:, None].expand_as(m)[m], num_traj, clip_ratio_low, clip_ratio_high,  # PCM
                        weights=weights, traj_token_counts=counts, num_sequences=stop - start)  # PCM

                    loss.backward()
                    append_to_dict(metrics, {'actor/pg_loss': loss.detach().item()})  # PCM: this slice's share

            grad_norm = self._optimizer_step()
            data = {'actor/grad_norm': grad_norm.detach().item()}
            append_to_dict(metrics, data)
            torch.cuda.empty_cache()
        self.actor_optimizer.zero_grad()
        torch.cuda.synchronize()
        torch.distributed.barrier()
        torch.cuda.empty_cache()
        return metrics
